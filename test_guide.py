"""Mask guidance that limits what the classifier sees: each mode's input computed by hand on tiny
images, the RRR penalty, and the audit's chance-corrected agreement."""
import pytest
import torch

from data import blank_background, crop_boxes, grow_mask, mask_boxes
from losses import cohen_kappa, rrr_penalty


def ramp(size):
    """(1, 1, size, size) image whose pixel (i, j) holds 10 * i + j: a crop shows where it came from."""
    i = torch.arange(size, dtype=torch.float32)
    return (10 * i[:, None] + i[None, :])[None, None]


def block(size, top, left, height, width):
    m = torch.zeros(1, 1, size, size)
    m[..., top:top + height, left:left + width] = 1
    return m


def test_grow_mask_adds_pixels_every_way():
    m = block(6, 2, 2, 1, 1)
    assert grow_mask(m, 0).equal(m)
    assert grow_mask(m, 1).equal(block(6, 1, 1, 3, 3))


def test_blank_background_keeps_the_grown_cell_and_zeroes_the_rest():
    x = torch.ones(1, 3, 6, 6)
    out = blank_background(x, block(6, 2, 2, 2, 2), grow_px=1)
    assert out[0, :, 1:5, 1:5].eq(1).all()
    assert out.sum() == 3 * 16   # only the 4x4 grown square survives, in each channel


def test_blank_background_of_an_empty_mask_keeps_the_image():
    x = torch.rand(2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[1, :, 0, 0] = 1
    out = blank_background(x, m, grow_px=0)
    assert out[0].equal(x[0])
    assert out[1].sum().item() == pytest.approx(x[1, :, 0, 0].sum().item())


def test_mask_box_is_the_square_around_the_bounding_box():
    m = block(8, 2, 3, 4, 2)   # rows 2-5, columns 3-4
    centre_x, centre_y, side = mask_boxes(m, margin=0.0)[0].tolist()
    assert (centre_x, centre_y, side) == (4.0, 4.0, 4.0)
    assert mask_boxes(m, margin=0.5)[0, 2] == 8.0
    assert mask_boxes(torch.zeros(1, 1, 8, 8), margin=0.15)[0].tolist() == [4.0, 4.0, 8.0]


def test_crop_copies_the_boxed_pixels():
    x = ramp(8)
    boxes = mask_boxes(block(8, 2, 2, 4, 4), margin=0.0)
    assert crop_boxes(x, boxes, size=4).equal(x[..., 2:6, 2:6])


def test_crop_repeats_the_edge_where_the_square_leaves_the_image():
    x = ramp(8)
    boxes = mask_boxes(block(8, 0, 0, 2, 2), margin=0.5)   # side 4 around rows/cols -1..2
    out = crop_boxes(x, boxes, size=4)[0, 0]
    expected = x[0, 0, [0, 0, 1, 2]][:, [0, 0, 1, 2]]
    assert out.equal(expected)


def test_crop_of_the_whole_image_is_the_image():
    x = torch.rand(2, 3, 8, 8)
    boxes = mask_boxes(torch.zeros(2, 1, 8, 8), margin=0.15)
    assert torch.allclose(crop_boxes(x, boxes, size=8), x, atol=1e-6)


class Weighted(torch.nn.Module):
    """Logits (B, 2) = +-(sum of x * look): it reads only the pixels where `look` is 1."""

    def __init__(self, look):
        super().__init__()
        self.look = look

    def forward(self, x):
        score = (x * self.look).sum(dim=(1, 2, 3))
        return torch.stack([score, -score], dim=1)


def test_rrr_penalty_is_zero_when_the_model_ignores_the_background():
    outside = 1 - block(4, 1, 1, 2, 2)
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    model = Weighted(1 - outside)
    penalty = rrr_penalty(model(x), x, outside, torch.tensor([True, True]))
    assert penalty.item() == 0


def test_rrr_penalty_by_hand_when_the_model_reads_the_background():
    outside = 1 - block(4, 1, 1, 2, 2)
    x = torch.zeros(1, 3, 4, 4, requires_grad=True)
    model = Weighted(torch.ones(1, 1, 4, 4))
    penalty = rrr_penalty(model(x), x, outside, torch.tensor([True]))
    # at x = 0, p = (1/2, 1/2): log p0 + log p1 is at its peak, so its slope is 0
    assert penalty.item() == 0
    x = torch.full((1, 3, 4, 4), 0.1, requires_grad=True)
    score = 0.1 * 48
    p0 = torch.sigmoid(torch.tensor(2 * score))
    slope = 2 - 4 * p0   # d(log p0 + log p1)/dscore for logits (s, -s)
    expected = 12 * 3 * slope ** 2            # 12 background pixels, 3 channels, each d score/dx = 1
    penalty = rrr_penalty(model(x), x, outside, torch.tensor([True]))
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    assert penalty.item() > 0


def test_rrr_penalty_counts_only_images_with_a_mask_and_trains():
    outside = 1 - block(4, 1, 1, 2, 2)
    look = torch.ones(1, 1, 4, 4, requires_grad=True)
    x = torch.full((2, 3, 4, 4), 0.1, requires_grad=True)
    both = rrr_penalty(Weighted(look)(x), x, outside, torch.tensor([True, True]))
    one = rrr_penalty(Weighted(look)(x), x, outside, torch.tensor([True, False]))
    assert one.item() == pytest.approx(both.item())   # the same image twice: the mean is one image's
    none = rrr_penalty(Weighted(look)(x), x, outside, torch.tensor([False, False]))
    assert none.item() == 0
    both.backward()
    assert look.grad is not None and look.grad.abs().sum() > 0   # double backprop reaches the weights


def test_cohen_kappa_by_hand():
    first = torch.tensor([0, 0, 1, 1])
    assert cohen_kappa(first, first, 2) == 1.0
    assert cohen_kappa(first, torch.tensor([1, 1, 0, 0]), 2) == -1.0
    # p_o = 3/4; shares (2/4, 2/4) and (3/4, 1/4): p_e = 2/4*3/4 + 2/4*1/4 = 1/2; kappa = 1/2
    assert cohen_kappa(first, torch.tensor([0, 0, 0, 1]), 2) == pytest.approx(0.5)


def test_cohen_kappa_of_a_model_that_says_one_class_is_zero():
    truth = torch.tensor([0, 0, 0, 1, 2])
    constant = torch.zeros(5, dtype=torch.long)
    assert cohen_kappa(truth, constant, 3) == pytest.approx(0.0)   # raw agreement 60%, no skill
    assert cohen_kappa(constant, constant, 3) == 1.0


def test_make_batch_crops_before_and_blanks_after_normalising():
    from data import IMAGENET_MEAN, IMAGENET_STD, guide_for, make_batch
    images = (torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8) * 3).repeat(1, 3, 1, 1)
    images = images.to(torch.uint8)
    masks = block(8, 2, 2, 4, 4).to(torch.uint8)
    idx = torch.tensor([0])
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    plain, _ = make_batch(images, masks, idx, "cpu", False)
    x, m = make_batch(images, masks, idx, "cpu", False, guide=("crop", 0.0))
    cropped = crop_boxes(images.float() / 255, mask_boxes(masks.float(), 0.0), 8)
    assert torch.allclose(x[0], (cropped[0] - mean) / std, atol=1e-5)
    assert m.eq(1).all()   # the box is the cell: the cropped mask fills the frame
    x, _ = make_batch(images, masks, idx, "cpu", False, guide=("input", 1))
    inside = block(8, 1, 1, 6, 6).bool()[0, 0]
    assert torch.allclose(x[0][:, inside], plain[0][:, inside])
    assert x[0][:, ~inside].eq(0).all()   # 0 after normalising: ImageNet's mean colour
    assert guide_for("crop", 128) == ("crop", 0.15)
    assert guide_for("input", 128) == ("input", 4)
    assert guide_for("loss", 128) is None and guide_for("channel", 128) is None
