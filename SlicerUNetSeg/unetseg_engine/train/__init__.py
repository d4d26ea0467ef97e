"""Training: nnU-Net-style planning, MONAI augmentation and losses, model-package export."""
