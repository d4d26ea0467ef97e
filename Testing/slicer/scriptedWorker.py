"""A misbehaving worker for the runner's tests; ``UNETSEG_TEST_WORKER`` says how it misbehaves.

Speaks just enough of ``unetseg_engine.workerprotocol`` (``ready`` with its pid, ``hello``,
``progress`` for a segment request), then, on a segment request:

- ``hang``: never answers, and ignores cancel and the end of its input, as a worker stuck in a long
  native call would (only killing its process stops it);
- ``bad-stderr``: writes a message in Windows' ANSI code page (cp1252, not UTF-8) on stderr, as the
  worker's libraries can before Python uses UTF-8 there, and exits with status 3.
"""

import json
import os
import platform
import sys
import time

from unetseg_engine.workerprotocol import PROTOCOL_VERSION

if __name__ == "__main__":
    behaviour = os.environ.get("UNETSEG_TEST_WORKER", "hang")
    print(json.dumps({"event": "ready", "pid": os.getpid(), "protocol": PROTOCOL_VERSION}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "hello":
            print(json.dumps({"event": "hello", "pid": os.getpid(), "python": platform.python_version(),
                              "utf8_mode": bool(sys.flags.utf8_mode)}), flush=True)
        elif request.get("cmd") == "segment":
            print(json.dumps({"event": "progress", "id": request["id"], "stage": "inference",
                              "fraction": 0.1}), flush=True)
            if behaviour == "bad-stderr":
                os.write(2, "Mémoire insuffisante pour l'opération\n".encode("cp1252"))
                sys.exit(3)
            while True:  # never reads stdin again: neither cancel nor end of input reach it
                time.sleep(1)
