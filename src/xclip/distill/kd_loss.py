"""The knowledge-distillation loss of the student (plain tensors in, tensors out).

    loss = sum_tasks CE(s, y) + alpha * T^2 * sum_tasks KL(softmax(t / T) || softmax(s / T))
           + beta * MSE(student features, projected teacher features)

KL is averaged over the batch (``batchmean``: the true KL per sample), MSE over every element.
The projection of the teacher features is a learned layer that belongs to the student's optimiser
(`FeatureProjection`), unlike the reference project, which created it inside the loss and never
trained it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DistillationLoss:
    """The total and its three terms (each already summed over tasks, before alpha / beta)."""

    total: Tensor
    ce: Tensor
    kd: Tensor
    mse: Tensor


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch ([B, K] logits -> scalar)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def distillation_loss(
    student_logits: Mapping[str, Tensor],
    teacher_logits: Mapping[str, Tensor] | None,
    labels: Mapping[str, Tensor],
    student_features: Tensor | None = None,
    projected_teacher_features: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 100.0,
    temperature: float = 2.0,
) -> DistillationLoss:
    """The student's loss over every task of `student_logits` ({task: [B, K]}); `labels` {task: [B]}.

    With ``alpha = beta = 0`` (the no-KD student) the teacher inputs may be None and only CE is
    computed. The teacher logits / features must come without gradient (a frozen teacher).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha} and {beta}")
    missing = set(student_logits) - set(labels)
    if missing:
        raise KeyError(f"no labels for task(s) {sorted(missing)}")
    first = next(iter(student_logits.values()))
    zero = first.new_zeros(())
    ce = sum((F.cross_entropy(logits, labels[task]) for task, logits in student_logits.items()), zero)
    kd, mse = zero, zero
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs the teacher's logits")
        kd = sum((kd_kl(logits, teacher_logits[task], temperature) for task, logits in student_logits.items()), zero)
    if beta > 0:
        if student_features is None or projected_teacher_features is None:
            raise ValueError("beta > 0 needs the student features and the projected teacher features")
        mse = F.mse_loss(student_features, projected_teacher_features)
    return DistillationLoss(ce + alpha * kd + beta * mse, ce, kd, mse)


class FeatureProjection(nn.Linear):
    """The learned projection of the teacher's fused features [B, d_teacher] onto the student's
    width [B, d_student] (the MSE term's target); trained with the student."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__(teacher_dim, student_dim)
