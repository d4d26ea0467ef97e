"""Slicer-free U-Net segmentation engine of SlicerUNetSeg.

Importing this package (and listing models) never imports torch, so that the Slicer panel can show
models before PyTorch is installed. Heavy modules (``inference``, ``networks``, ``train``) import torch
themselves when they are used.
"""

__version__ = "0.1.0"

from .errors import UNetSegError  # noqa: E402  (re-exported for callers)

__all__ = ["UNetSegError", "__version__"]
