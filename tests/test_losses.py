import torch
import torch.nn.functional as F

from kd_sentiment.training.losses import distillation_loss


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


def test_label_smoothing_applies_to_the_hard_label_term_only():
    s, t, y = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    eps, T, a = 0.1, 2.0, 0.5
    log_p = F.log_softmax(s, -1)
    smoothed_ce = -((1 - eps) * log_p.gather(1, y[:, None]).squeeze(1) + eps * log_p.mean(-1)).mean()
    soft = distillation_loss(s, y, t, T, 1.0)  # alpha=1: no hard-label term, smoothing has nothing to act on
    assert torch.allclose(distillation_loss(s, y, t, T, 1.0, label_smoothing=eps), soft)
    expected = a * soft + (1 - a) * smoothed_ce
    assert torch.allclose(distillation_loss(s, y, t, T, a, label_smoothing=eps), expected, atol=1e-6)


def test_unlabelled_transfer_examples_learn_from_the_teacher_alone():
    """A transfer-set text (label UNLABELLED) gets T^2 KL with weight 1 and no hard-label term;
    labelled texts in the same batch keep the mixed loss, averaged over all examples."""
    from kd_sentiment.training.losses import UNLABELLED

    s, t, y = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    y[5:] = UNLABELLED
    T, a = 2.0, 0.3
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1)
    ce = F.cross_entropy(s[:5], y[:5], reduction="none")
    expected = (torch.cat([a * T * T * kl[:5] + (1 - a) * ce, T * T * kl[5:]])).mean()
    assert torch.allclose(distillation_loss(s, y, t, T, a), expected, atol=1e-6)
    try:
        distillation_loss(s, y, None, T, 0.0)
    except ValueError as err:
        assert "alpha=0" in str(err)
    else:
        raise AssertionError("alpha=0 with unlabelled examples must be refused")
