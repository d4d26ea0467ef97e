"""Stands in for Slicer's ``PythonSlicer``, the CTK application launcher, in the worker tests.

What matters of the real one (commontk/AppLauncher, ``Base/ctkAppLauncher.cpp``): it runs
``bin/python-real`` with the same arguments as its *child* process, with stdin, stdout and stderr
forwarded (``QProcess::ForwardedChannels`` and ``ForwardedInputChannel``), waits for it, and exits with
the child's exit code; when the child crashed (``QProcess::CrashExit``, e.g. killed for memory) it
prints ``error: [<program>] exit abnormally - Report the problem.`` on stderr and exits with 1. Killing
the launcher alone leaves python-real running.

Usage: ``python fakeLauncher.py <python arguments...>``
"""

import subprocess
import sys

if __name__ == "__main__":
    child = subprocess.Popen([sys.executable] + sys.argv[1:])  # inherits (forwards) stdin/out/err
    code = child.wait()
    if code < 0:  # killed by a signal: Qt's CrashExit
        print(f"error: [{sys.executable}] exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code)
