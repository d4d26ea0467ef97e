"""Slicer-free U-Net segmentation engine of SlicerUNetSeg.

Importing this package (and listing models) never imports torch, so that the Slicer panel can show
models before PyTorch is installed. Heavy modules (``inference``, ``networks``, ``train``) import torch
themselves when they are used.
"""

import warnings

__version__ = "0.1.0"

# MONAI 1.5's sliding-window inference indexes tensors with lists, which torch >= 2.9 warns about on
# every window (inference, the benchmark's MONAI reference and training-time validation alike). Set
# once here so that every entry point is quiet; the message is matched exactly, nothing else hidden.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")

from .errors import UNetSegError  # noqa: E402  (re-exported for callers)

__all__ = ["UNetSegError", "__version__"]
