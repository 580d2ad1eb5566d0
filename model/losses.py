"""Losses: the multi-task normalized-softmax loss (cross-entropy on each head's cosine logits)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_LABEL = -1  # label value of an example that has no label for a task


class NormalizedSoftmaxLoss(nn.Module):
    """Sum over tasks of weight * cross-entropy of the task's logits; returns {"loss", "loss/<task>"}.

    The temperature is applied by the head (logits are already cosine / temperature).
    """

    def __init__(self, task_weights: Mapping[str, float], label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not task_weights:
            raise ValueError("NormalizedSoftmaxLoss needs at least one task")
        self.task_weights = dict(task_weights)
        self.label_smoothing = label_smoothing

    def forward(self, outputs: Mapping[str, torch.Tensor],
                labels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        total = None
        for task, weight in self.task_weights.items():
            logits = outputs[f"logits/{task}"].float()
            loss = F.cross_entropy(logits, labels[task], ignore_index=IGNORE_LABEL,
                                   label_smoothing=self.label_smoothing)
            losses[f"loss/{task}"] = loss
            total = weight * loss if total is None else total + weight * loss
        assert total is not None
        return {"loss": total, **losses}
