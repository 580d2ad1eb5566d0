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


def soft_target_cross_entropy(logits: torch.Tensor, multi_hot: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the multi-hot labels normalised to a distribution (weakly supervised pretraining,
    as in Mahajan et al. 2018); images without any label are left out of the mean."""
    counts = multi_hot.sum(dim=1)
    keep = counts > 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    target = multi_hot[keep] / counts[keep, None]
    return -(target * F.log_softmax(logits[keep].float(), dim=1)).sum(dim=1).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft distillation (Hinton et al.): KL(teacher || student) at a temperature, scaled by T^2; rows whose
    teacher logits are all zero (no teacher output for that image) are left out."""
    keep = teacher.abs().sum(dim=1) > 0
    if not bool(keep.any()):
        return student.sum() * 0.0
    log_p = F.log_softmax(student[keep].float() / temperature, dim=1)
    q = F.softmax(teacher[keep].float() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature ** 2


class MultiTaskLoss(nn.Module):
    """The training objective of both stages, returning {"loss", "loss/<part>"}.

    Parts: a normalized-softmax cross-entropy per task (labels `label/<task>`, IGNORE_LABEL masked), the
    weak-label soft-target cross-entropy (`weak`), and distillation from teacher logits (`teacher/<task>`).
    Tasks are mixed in every batch and their losses summed with their weights.
    """

    def __init__(self, task_weights: Mapping[str, float], weak_weight: float = 0.0, distill_weight: float = 0.0,
                 distill_temperature: float = 2.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not task_weights and weak_weight <= 0:
            raise ValueError("MultiTaskLoss needs at least one task or the weak-label loss")
        self.task_weights = dict(task_weights)
        self.weak_weight = weak_weight
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.label_smoothing = label_smoothing

    def forward(self, outputs: Mapping[str, torch.Tensor],
                targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None

        def add(name: str, weight: float, value: torch.Tensor) -> None:
            nonlocal total
            parts[f"loss/{name}"] = value
            total = weight * value if total is None else total + weight * value

        for task, weight in self.task_weights.items():
            logits, labels = outputs[f"logits/{task}"].float(), targets[f"label/{task}"]
            if bool((labels != IGNORE_LABEL).any()):
                add(task, weight, F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL,
                                                  label_smoothing=self.label_smoothing))
            else:
                add(task, weight, logits.sum() * 0.0)
            if self.distill_weight > 0 and f"teacher/{task}" in targets:
                add(f"distill/{task}", self.distill_weight * weight,
                    distillation_loss(logits, targets[f"teacher/{task}"], self.distill_temperature))
        if self.weak_weight > 0:
            add("weak", self.weak_weight, soft_target_cross_entropy(outputs["logits/weak"], targets["weak"]))
        assert total is not None
        return {"loss": total, **parts}
