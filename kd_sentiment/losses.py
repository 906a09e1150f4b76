"""Training losses: cross-entropy for the teacher, Hinton et al. (2015) distillation for students."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                      teacher_logits: torch.Tensor | None, temperature: float, alpha: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels).

    The T^2 factor keeps the soft-target gradients at the same scale as the hard-target ones when T
    changes (Hinton et al. 2015, section 2). alpha=0 is plain fine-tuning and needs no teacher;
    alpha=1 is pure soft-target distillation. label_smoothing applies to the hard-label term only
    (Szegedy et al. 2016): it trains a less confident model, e.g. a teacher of different calibration.
    """
    ce = (F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing) if alpha < 1
          else student_logits.new_zeros(()))
    if alpha == 0:
        return ce
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                  F.log_softmax(teacher_logits / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce

