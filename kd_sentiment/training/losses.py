"""Training losses: cross-entropy for the teacher, Hinton et al. (2015) distillation for students."""
from __future__ import annotations

import torch
import torch.nn.functional as F


UNLABELLED = -100  # the label of a transfer-set text: only the teacher labelled it (torch's ignore_index)


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                      teacher_logits: torch.Tensor | None, temperature: float, alpha: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Per example alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student,
    label), averaged over the batch.

    The T^2 factor keeps the soft-target gradients at the same scale as the hard-target ones when T
    changes (Hinton et al. 2015, section 2). alpha=0 is plain fine-tuning and needs no teacher;
    alpha=1 is pure soft-target distillation. label_smoothing applies to the hard-label term only
    (Szegedy et al. 2016): it trains a less confident model, e.g. a teacher of different calibration.
    An example labelled UNLABELLED (a transfer-set text) learns from the KD term alone, with weight 1.
    """
    labelled = labels != UNLABELLED
    if alpha == 0:
        if not bool(labelled.all()):
            raise ValueError("alpha=0 needs a label for every example: unlabelled (transfer) texts need a teacher.")
        return F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - F.log_softmax(student_logits / temperature, dim=-1))).sum(-1)
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing, reduction="none",
                         ignore_index=UNLABELLED)
    kd_weight = torch.where(labelled, torch.full_like(kl, alpha), torch.ones_like(kl))
    ce_weight = torch.where(labelled, torch.full_like(ce, 1 - alpha), torch.zeros_like(ce))
    return (kd_weight * temperature ** 2 * kl + ce_weight * ce).mean()
