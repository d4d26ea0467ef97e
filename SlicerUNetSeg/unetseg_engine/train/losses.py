"""Losses for partially contoured training data: the marginal Dice + cross-entropy.

In a partially contoured case an organ that was not drawn has 0 voxels like real background. Read
as background, those zeros teach the network that the organ is absent. The marginal loss (Shi et
al., "Marginal loss and exclusion loss for partially supervised multi-organ segmentation", Medical
Image Analysis 2021; Fidon et al. 2021 show marginalisation is the principled choice) instead merges
what cannot be told apart: for a case, the probability of "background" is the probability of
background plus that of every organ not contoured in it, so predicting an uncontoured organ where the
map says 0 costs nothing. Dice is computed only over the organs contoured in each case.

On a fully contoured case both terms are exactly MONAI's ``DiceCELoss(to_onehot_y=True,
softmax=True, include_background=False, batch=True)`` (``Testing/test_partial_labels.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr


class MarginalDiceCELoss(torch.nn.Module):
    """Dice + cross-entropy for multi-class softmax outputs that ignores uncontoured organs.

    ``forward(logits, target, labelled)``: logits (B, C, ...), target (B, 1, ...) of class indices,
    and ``labelled`` (B, C) bool, True where class c was contoured in sample b (column 0, the
    background, is ignored). Without ``labelled`` every class counts as contoured.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                labelled: torch.Tensor | None = None) -> torch.Tensor:
        n_classes = logits.shape[1]
        target = target[:, 0].long()
        if labelled is None:
            labelled = torch.ones(logits.shape[0], n_classes, dtype=torch.bool, device=logits.device)
        labelled = labelled.to(logits.device).clone()
        labelled[:, 0] = True
        return self.dice(logits, target, labelled) + self.cross_entropy(logits, target, labelled)

    @staticmethod
    def cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                      labelled: torch.Tensor) -> torch.Tensor:
        """Mean voxel cross-entropy, the background channel merged with the uncontoured organs.

        log p(merged background) = logsumexp over {background, uncontoured} - logsumexp over all.
        """
        shape = (*labelled.shape, *([1] * (logits.dim() - 2)))
        log_total = torch.logsumexp(logits, dim=1)
        merged = logits.masked_fill(labelled.view(shape), float("-inf"))
        merged[:, :1] = logits[:, :1]  # the background itself always belongs to the merged class
        log_background = torch.logsumexp(merged, dim=1)
        log_target = torch.gather(logits, 1, target[:, None])[:, 0]
        log_target = torch.where(target == 0, log_background, log_target)
        return (log_total - log_target).mean()

    @staticmethod
    def dice(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Soft Dice per foreground class, summed over the samples that contoured it (MONAI's
        ``batch=True``), averaged over the classes contoured in at least one sample."""
        n_classes = logits.shape[1]
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target, n_classes).movedim(-1, 1).to(probs.dtype)
        dims = tuple(range(2, logits.dim()))
        intersection = (probs * onehot).sum(dims)  # (B, C)
        denominator = probs.sum(dims) + onehot.sum(dims)
        weight = labelled.to(probs.dtype)
        intersection = (intersection * weight).sum(0)[1:]
        denominator = (denominator * weight).sum(0)[1:]
        per_class = 1 - (2 * intersection + SMOOTH) / (denominator + SMOOTH)
        present = labelled[:, 1:].any(0)
        return per_class[present].mean() if present.any() else logits.sum() * 0
