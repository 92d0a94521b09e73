"""Numbers a user can trust: temperature scaling, calibration metrics by hand, and test-time
augmentation over the 8 flips and quarter turns."""
import pytest
import torch
import torch.nn.functional as F

from data import d4_undo, d4_views
from losses import calibration_metrics, fit_temperature


def calibrated_logits(n=4000, classes=5, seed=0):
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 2
    labels = torch.multinomial(F.softmax(logits, 1), 1, generator=generator)[:, 0]
    return logits, labels


def test_temperature_of_calibrated_logits_is_near_one():
    logits, labels = calibrated_logits()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_temperature_of_logits_scaled_by_three_is_near_three():
    logits, labels = calibrated_logits()
    assert fit_temperature(3 * logits, labels) == pytest.approx(3.0, rel=0.1)


def test_calibration_metrics_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1])
    m = calibration_metrics(probs, labels, bins=2)
    # top probabilities 0.9 (right), 0.6 (wrong), 0.7 (right), all in bin (0.5, 1]:
    # accuracy 2/3, mean confidence 2.2/3, ECE = |2/3 - 2.2/3| = 0.2/3
    assert m["ece"] == pytest.approx(0.2 / 3)
    brier = ((0.1 ** 2 + 0.1 ** 2) + (0.6 ** 2 + 0.6 ** 2) + (0.3 ** 2 + 0.3 ** 2)) / 3
    assert m["brier"] == pytest.approx(brier)
    nll = -(torch.tensor([0.9, 0.4, 0.7]).log().mean())
    assert m["nll"] == pytest.approx(nll.item())


def test_ece_bins_weigh_by_their_share():
    probs = torch.tensor([[1.0, 0.0], [0.55, 0.45], [0.55, 0.45], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 1, 1])
    # bin (0.5, 0.75]: 3 images, accuracy 1/3, confidence 0.55; bin (0.75, 1]: 1 image, exact
    expected = 3 / 4 * abs(1 / 3 - 0.55)
    assert calibration_metrics(probs, labels, bins=4)["ece"] == pytest.approx(expected)


def test_d4_views_are_the_eight_symmetries_and_undo_inverts_them():
    x = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 1, 3, 3)
    views = d4_views(x)
    assert views.shape == (16, 1, 3, 3)
    distinct = {tuple(v.flatten().tolist()) for v in views[:8]}
    assert len(distinct) == 8
    assert views[:2].equal(x)
    assert d4_undo(views).equal(x.expand(8, -1, -1, -1, -1))


def test_d4_mean_of_an_invariant_model_equals_its_plain_output():
    x = torch.rand(3, 3, 8, 8)
    mean_pool = lambda batch: batch.mean(dim=(2, 3))   # invariant to flips and quarter turns
    views = mean_pool(d4_views(x)).unflatten(0, (8, -1))
    assert torch.allclose(views.mean(0), mean_pool(x), atol=1e-6)
