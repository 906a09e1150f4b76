import torch
import torch.nn.functional as F

from kd_sentiment.losses import distillation_loss


def test_alpha_zero_is_cross_entropy_without_teacher():
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.allclose(distillation_loss(logits, labels, None, 2.0, 0.0), F.cross_entropy(logits, labels))


def test_soft_loss_is_zero_when_student_matches_teacher():
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert distillation_loss(logits, labels, logits.clone(), 4.0, 1.0).abs() < 1e-6


def test_kd_loss_matches_formula():
    s, t, y = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    T, a = 3.0, 0.7
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    expected = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, y, t, T, a), expected, atol=1e-6)
