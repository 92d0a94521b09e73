"""Losses and metrics, checked by hand on tiny tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (bce, center_bce, center_weights, check_alpha, class_weights, classification_metrics,
                    confusion_matrix, mask_counts, mask_metrics, mask_weighted_ce,
                    mean_image_dice, weighted_ce)


# ---------------------------------------------------------------------------- stage 1

def test_bce_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    sig = lambda z: 1 / (1 + math.exp(-z))
    by_hand = -(math.log(sig(0)) + math.log(1 - sig(2)) + math.log(1 - sig(-1)) + math.log(sig(3))) / 4
    assert bce(logits, target).item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("h,w", [(4, 4), (5, 5), (6, 10), (32, 32)])
def test_center_weights_symmetric_peaked_mean_one(h, w):
    wt = center_weights(h, w)
    assert wt.shape == (h, w)
    assert wt.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(wt, wt.flip(0)) and torch.allclose(wt, wt.flip(1))
    assert wt[0, 0].item() == pytest.approx(0.0, abs=1e-6)          # a corner pixel: d = d_max
    assert wt[h // 2, w // 2].item() == pytest.approx(wt.max().item())
    assert (wt >= -1e-6).all()


def test_center_weights_3x3_by_hand():
    # pixel centres at distance 0, 1, sqrt(2) from the centre; d_max = sqrt(2)
    raw = torch.tensor([[1 - 1, 1 - 1 / math.sqrt(2), 0],
                        [1 - 1 / math.sqrt(2), 1, 1 - 1 / math.sqrt(2)],
                        [0, 1 - 1 / math.sqrt(2), 0]])
    assert torch.allclose(center_weights(3, 3), raw / raw.mean(), atol=1e-6)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_center_weights_without_a_centre_pixel_are_uniform(h, w):
    # every pixel is a corner (d = d_max everywhere): 1 - d/d_max is 0 everywhere, no pixel is
    # nearer the centre than another; the weights are all 1 (plain BCE), never 0/0 = NaN
    assert torch.equal(center_weights(h, w), torch.ones(h, w))


def test_center_bce_is_weighted_mean_of_bce():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    assert center_bce(logits, target).item() == pytest.approx((per_pixel * center_weights(6, 6)).mean().item(), rel=1e-6)
    # an error at a corner costs nothing, the same error at the centre costs the most
    t = torch.zeros(1, 1, 6, 6)
    corner, centre = torch.full_like(t, -10.0), torch.full_like(t, -10.0)
    corner[..., 0, 0], centre[..., 3, 3] = 5.0, 5.0
    assert center_bce(corner, t) < center_bce(centre, t)


# ---------------------------------------------------------------------------- stage 2

@pytest.mark.parametrize("a1,a2", [(0, 1), (1, 0), (-1, 1), (2, 0.5), (-0.5, 1)])
def test_alpha_identity(a1, a2):
    """(a1*m + a2) = (a1 + a2)*m + a2*(1 - m): the weight mixes cell and surroundings."""
    m = torch.linspace(0, 1, 11)
    assert torch.allclose(a1 * m + a2, (a1 + a2) * m + a2 * (1 - m))


@pytest.mark.parametrize("a1,a2,why", [(0, 0, "every location 0"), (1, -0.1, "negative"), (-2, 1, "negative"),
                                       (-1, -1, "negative"), (math.nan, 1, "finite"), (1, math.inf, "finite")])
def test_invalid_alpha_refused(a1, a2, why):
    assert why in check_alpha(a1, a2)


@pytest.mark.parametrize("a1,a2", [(0, 1), (1, 0), (-1, 1), (3, 2)])
def test_valid_alpha_accepted(a1, a2):
    assert check_alpha(a1, a2) is None


def test_uniform_alpha_is_not_plain_ce_on_a_2x2_map():
    """alpha (0, 1) averages the CE of the 4 locations; plain CE takes the CE of the averaged logits.
    By hand: locations with logits (2, 0) and (0, 2), label 0: per-location CE ln(1+e^-2) and ln(1+e^2),
    mean 1.0635; the mean logit is (1, 1), whose CE is ln 2 = 0.6931."""
    L = torch.tensor([[[[2.0, 0.0], [2.0, 0.0]],                 # class 0's map
                       [[0.0, 2.0], [0.0, 2.0]]]])               # class 1's map: (1, C=2, h=2, w=2)
    y, mask = torch.tensor([0]), torch.ones(1, 1, 4, 4)
    uniform, _ = mask_weighted_ce(L, y, mask, (0, 1))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    assert uniform.item() == pytest.approx(expected, rel=1e-6)
    assert weighted_ce(L.mean((2, 3)), y).item() == pytest.approx(math.log(2), rel=1e-6)


def test_constant_weight_equals_plain_cross_entropy():
    torch.manual_seed(0)
    L = torch.randn(3, 5, 2, 2)
    y = torch.tensor([0, 3, 4])
    mask = (torch.rand(3, 1, 8, 8) > 0.5).float()
    loss, empty = mask_weighted_ce(L, y, mask, (0, 1))
    per_location = F.cross_entropy(L, y[:, None, None].expand(3, 2, 2), reduction="none")
    assert loss.item() == pytest.approx(per_location.mean().item(), rel=1e-6)
    assert empty.item() == 0


def test_mask_weighted_ce_by_hand():
    # one sample, 2 classes, logit map 1x2: location 0 is all cell, location 1 half cell
    L = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])       # (1, 2, 1, 2)
    y = torch.tensor([0])
    mask = torch.tensor([[[[1.0, 1.0, 1.0, 0.0]]]])        # (1, 1, 1, 4) -> pooled to [1, 0.5]
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    ce1 = -math.log(1 / (1 + math.exp(1)))
    loss, _ = mask_weighted_ce(L, y, mask, (1, 0))
    assert loss.item() == pytest.approx((1 * ce0 + 0.5 * ce1) / 1.5, rel=1e-6)
    loss, _ = mask_weighted_ce(L, y, mask, (-1, 1))
    assert loss.item() == pytest.approx((0 * ce0 + 0.5 * ce1) / 0.5, rel=1e-6)


def test_class_weights_in_batch_loss():
    L = torch.zeros(2, 2, 1, 1)
    L[0, 0] = 1.0                                            # sample 0 right-ish, sample 1 unsure
    y = torch.tensor([0, 1])
    mask = torch.ones(2, 1, 4, 4)
    cw = torch.tensor([3.0, 1.0])
    per = F.cross_entropy(L[:, :, 0, 0], y, reduction="none")
    loss, _ = mask_weighted_ce(L, y, mask, (0, 1), cw)
    assert loss.item() == pytest.approx(((3 * per[0] + 1 * per[1]) / 4).item(), rel=1e-6)
    assert weighted_ce(L[:, :, 0, 0], y, cw).item() == pytest.approx(loss.item(), rel=1e-6)


def test_empty_mask_sample_adds_nothing_and_is_counted():
    torch.manual_seed(0)
    L = torch.randn(2, 5, 2, 2)
    y = torch.tensor([1, 2])
    mask = torch.zeros(2, 1, 4, 4)
    mask[0] = 1.0                                            # sample 1 has no cell
    both, empty = mask_weighted_ce(L, y, mask, (1, 0))
    alone, _ = mask_weighted_ce(L[:1], y[:1], mask[:1], (1, 0))
    assert empty.item() == 1
    assert both.item() == pytest.approx(alone.item(), rel=1e-6)


def _location_grads(alpha, mask):
    torch.manual_seed(0)
    L = torch.randn(1, 5, 2, 2, requires_grad=True)
    loss, _ = mask_weighted_ce(L, torch.tensor([2]), mask, alpha)
    loss.backward()
    return L.grad.abs().sum(1)[0]                           # (2, 2) gradient size per location


def test_cell_only_and_surroundings_only_gradients():
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, 0] = 1.0                                    # the cell is location (0, 0)
    g = _location_grads((1, 0), mask)
    assert g[0, 0] > 0 and (g.flatten()[1:] == 0).all()      # (1,0): nothing from outside the mask
    g = _location_grads((-1, 1), mask)
    assert g[0, 0] == 0 and (g.flatten()[1:] > 0).all()      # (-1,1): nothing from inside
    g = _location_grads((0, 1), mask)
    assert (g > 0).all() and torch.isfinite(g).all()


def test_class_weights_inverse_count_mean_one():
    w = class_weights([10, 20, 40])
    assert w.mean().item() == pytest.approx(1.0)
    assert torch.allclose(w, torch.tensor([4.0, 2.0, 1.0]) / (7 / 3))
    w = class_weights([0, 5, 5])                             # an absent class gets 0, not inf
    assert w.tolist() == pytest.approx([0.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        class_weights([0, 0])


# ---------------------------------------------------------------------------- metrics

def test_confusion_and_metrics_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    p = torch.tensor([0, 0, 1, 1, 0, 2])
    conf = confusion_matrix(y, p, 3)
    assert conf.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    m = classification_metrics(conf, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_error"] == pytest.approx({"a": 1 / 3, "b": 0.5, "c": 0.0})
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    f1 = [2 * (2 / 3) * (2 / 3) / (4 / 3), 0.5, 1.0]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["majority_baseline"] == pytest.approx(3 / 6)
    assert m["weighted_mean_error"] == pytest.approx(2 / 6)


def test_per_class_error_std_matches_report():
    """The report's class-balance table: errors (%) -> std 6.45 before, 3.79 after."""
    for errors, std in [([0, 15.08, 1.46, 12.63, 0.94], 6.45), ([0, 10.32, 4.61, 8.42, 2.36], 3.79)]:
        # 10000 samples per class make the error rates exact
        conf = torch.zeros(5, 5, dtype=torch.long)
        for i, e in enumerate(errors):
            wrong = round(e * 100)
            conf[i, i], conf[i, (i + 1) % 5] = 10000 - wrong, wrong
        m = classification_metrics(conf, list("abcde"))
        assert 100 * m["per_class_error_std"] == pytest.approx(std, abs=0.01)


def test_class_missing_from_truth_has_no_error():
    conf = torch.tensor([[3, 0], [0, 0]])
    m = classification_metrics(conf, ["a", "b"])
    assert m["per_class_error"]["b"] is None and m["balanced_accuracy"] == 1.0


def test_mask_metrics_by_hand():
    pred = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    true = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    counts = mask_counts(pred, true)
    assert counts.tolist() == [1, 1, 1, 1]
    m = mask_metrics(counts)
    assert m == pytest.approx({"pixel_error": 0.5, "iou": 1 / 3, "dice": 0.5})
    assert mask_metrics(mask_counts(true, true)) == pytest.approx({"pixel_error": 0.0, "iou": 1.0, "dice": 1.0})


def test_mean_image_dice_by_hand():
    """Per image, then the mean: image 1 Dice 2*1/(2*1 + 1 + 1) = 0.5, image 2 (both empty) 1,
    image 3 0. Pooled over the pixels of all three: 2*1/(2*1 + 1 + 1 + 2) = 1/3."""
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]], dtype=torch.bool)
    true = torch.tensor([[[1, 0, 1, 0]], [[0, 0, 0, 0]], [[1, 1, 0, 0]]], dtype=torch.bool)
    assert mean_image_dice(pred, true) == pytest.approx((0.5 + 1 + 0) / 3)
    assert mask_metrics(mask_counts(pred, true))["dice"] == pytest.approx(1 / 3)
    assert isinstance(mean_image_dice(pred, true), float)
