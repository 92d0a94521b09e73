"""A new microscope: pretraining the masker on several mask sources, augmentation for other stains and
scales, test-time BatchNorm adaptation (AdaBN) and predict.py on a folder of new images."""
import csv

import numpy as np
import pytest
import torch

from PIL import Image

import data
import evaluate
import predict
import train_classifier
import train_masker
from data import DataError, augment, mask_root, white_balance
from resnet_cls import ResNetClassifier
from test_robustness import noise_image, run_argv, square_mask, tiny_wbc
from unet import UNet


# ---------------------------------------------------------------------------- augmentation switches

def red_square_batch(b=6, s=32):
    """Images (B, 3, S, S) grey with a red square, and the square as mask (B, 1, S, S)."""
    x = torch.full((b, 3, s, s), 0.5)
    m = torch.zeros(b, 1, s, s)
    m[:, :, 8:20, 10:24] = 1
    x = torch.where(m.bool(), torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1), x)
    return x, m


@pytest.mark.parametrize("zoom", [(0.75, 1.0), (1.2, 1.6)])
def test_zoom_in_and_out_keep_mask_on_the_cell(zoom):
    x, m = red_square_batch()
    torch.manual_seed(0)
    xa, ma = augment(x, m, zoom=zoom, jitter=0.0)
    red = (xa[:, 0] - xa[:, 1]) > 0.4                       # where the red cell landed
    assert set(ma.unique().tolist()) <= {0.0, 1.0}
    agree = (red == ma[:, 0].bool()).float().mean().item()
    assert agree > 0.97, agree
    if zoom[0] > 1:                                         # zoomed out: the cell covers less of the frame
        assert ma.mean() < m.mean()


def test_switches_off_draw_exactly_the_default():
    x, m = red_square_batch()
    torch.manual_seed(1)
    a = augment(x, m)
    torch.manual_seed(1)
    b = augment(x, m, stain=0.0, blur=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_stain_turns_hue_and_keeps_brightness():
    x, m = red_square_batch(b=64)
    torch.manual_seed(2)
    xs, ms = augment(x, m, zoom=(1.0, 1.0), jitter=0.0, stain=1.0)
    luma = lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]   # noqa: E731
    flat = xs[:, :, 0, 0]                                   # a background (grey) pixel: stays grey-ish
    assert (flat.max(1).values - flat.min(1).values).max() < 0.02
    cell = xs[:, :, 12, 15]
    assert (cell.argmax(1) != 0).any(), "some red cells turned another hue"
    assert (luma(xs) - luma(x)).abs().mean() < 0.03, "hue and saturation turn the chroma, not the brightness"
    assert torch.equal(ms.sum((1, 2, 3)), m.sum((1, 2, 3))), "the mask does not move with a colour change"


def test_blur_smooths_edges_only():
    x, m = red_square_batch()
    torch.manual_seed(3)
    xb, mb = augment(x, m, zoom=(1.0, 1.0), jitter=0.0, blur=2.0)
    edges = lambda t: ((t[..., 1:] - t[..., :-1]) ** 2).sum()   # noqa: E731 - blurring spreads a step: less energy
    assert edges(xb) < edges(augment(x, m, zoom=(1.0, 1.0), jitter=0.0)[0])
    assert xb.shape == x.shape and torch.allclose(xb.mean(), x.mean(), atol=0.02)
    assert set(mb.unique().tolist()) <= {0.0, 1.0}


def test_white_balance_turns_the_background_white_and_scales_the_cell_alike():
    x = torch.empty(2, 3, 10, 10)
    x[0] = torch.tensor([1.0, 0.9, 0.6]).view(3, 1, 1)           # a yellow lamp: background everywhere ...
    x[0, :, 3:7, 3:7] = torch.tensor([0.5, 0.3, 0.4]).view(3, 1, 1)   # ... but a purple 4x4 cell
    x[1] = torch.rand(3, 10, 10) * 0.5                            # no bright background: the brightest tenth
    y = white_balance(x)
    assert torch.allclose(y[0, :, 0, 0], torch.ones(3))
    assert torch.allclose(y[0, :, 5, 5], torch.tensor([0.5, 0.3 / 0.9, 0.4 / 0.6]))
    luma = torch.einsum("c,chw->hw", torch.tensor([0.299, 0.587, 0.114]), x[1]).flatten()
    bright = luma >= luma.sort().values[90]                       # 10 of 100 pixels
    assert torch.allclose(y[1], (x[1] / x[1].flatten(1)[:, bright].mean(1).view(3, 1, 1)).clamp(0, 1))
    assert torch.equal(white_balance(torch.ones(1, 3, 4, 4)), torch.ones(1, 3, 4, 4))   # white stays white


def test_white_balance_flag_is_kept_for_evaluate_and_predict(tmp_path, monkeypatch):
    wbc = tiny_wbc(tmp_path / "d")
    seen = []
    monkeypatch.setattr(data, "white_balance", lambda x, real=data.white_balance: seen.append(len(x)) or real(x))
    for flag in ("", "--white-balance"):
        out = tmp_path / f"c{flag}"
        train_classifier.main(run_argv(wbc, out, "--dry-run", *[flag][:len(flag)]))
        trained, seen[:] = list(seen), []
        evaluate.main([str(out / "checkpoint.pt"), "--device", "cpu"])
        predict.main([str(wbc / "WBC_100" / "val" / "data"), "--classifier", str(out / "checkpoint.pt"),
                      "--out", str(tmp_path / "pred"), "--adapt-bn"])
        # training: a batch of 3 and the 2 val images; evaluate: 2; predict: AdaBN's 2, then 2
        assert (trained, seen) == (([3, 2], [2, 2, 2]) if flag else ([], [])), flag
        seen.clear()


# ---------------------------------------------------------------------------- pretraining on several roots

def cam16_like(root, n=3):
    for i in range(n):
        noise_image(root / "train" / "data" / "tumor" / f"c{i}.png", 2, seed=i)
        square_mask(root / "train" / "mask" / "tumor" / f"c{i}.png")
    return root


def test_pretrain_on_the_union_of_several_roots(tmp_path, capsys):
    wbc = tiny_wbc(tmp_path / "d")
    other = tiny_wbc(tmp_path / "other_lab", n_train=2)          # another WBC dataset: its WBC_100/train
    cam = cam16_like(tmp_path / "cam")                            # a CAM16-like folder: its train/
    train_masker.main(run_argv(wbc, tmp_path / "out", "--dry-run", "--pretrain-on", str(cam), str(other)))
    assert "pretrain on 7 masks for 1 epochs" in capsys.readouterr().out   # 3 + 2 x 2 classes


@pytest.mark.parametrize("replay,fine_tuned_on", [(0, 6), (2, 2 * 6 + 3)])
def test_replay_keeps_the_pretraining_masks_in_fine_tuning(tmp_path, capsys, replay, fine_tuned_on):
    """--replay N: the fine-tuning stage trains on the split's 6 masks N times plus the 3 pretraining masks."""
    wbc, cam = tiny_wbc(tmp_path / "d"), cam16_like(tmp_path / "cam")
    metrics = train_masker.main(run_argv(wbc, tmp_path / "out", "--dry-run", "--pretrain-on", str(cam),
                                         "--replay", str(replay)))
    assert f"wbc on {fine_tuned_on} masks for 1 epochs" in capsys.readouterr().out and metrics["n_masks"] == 6
    with pytest.raises(SystemExit):   # nothing to replay without --pretrain-on
        train_masker.parse_args(["--replay", "2"])


def test_pretrain_on_own_split_masks_is_refused(tmp_path):
    wbc = tiny_wbc(tmp_path / "d")
    with pytest.raises(DataError, match="holds the trained dataset.s masks: over the split.s budget"):
        mask_root(wbc, wbc)
    with pytest.raises(DataError, match="no train/mask"):
        mask_root(tmp_path, wbc)


# ---------------------------------------------------------------------------- AdaBN and predict.py

def test_adabn_sets_batch_statistics_and_keeps_weights():
    torch.manual_seed(0)
    model = ResNetClassifier(3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    images = (torch.rand(8, 3, 64, 64) * 255).to(torch.uint8)
    seen = {}
    bn1 = model.backbone.bn1
    hook = model.backbone.conv1.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", out.detach()))
    predict.adapt_batchnorm(model, images, None, batch_size=8, device="cpu")
    hook.remove()
    x = seen["x"].float()
    assert torch.allclose(bn1.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn1.running_var, x.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "AdaBN changed a weight"


def test_predict_writes_csv_masks_and_overlays_for_nested_folders(tmp_path):
    wbc = tiny_wbc(tmp_path / "d")
    masker_out, cls_out = tmp_path / "m", tmp_path / "c"
    train_masker.main(run_argv(wbc, masker_out, "--dry-run"))
    train_classifier.main(run_argv(wbc, cls_out, "--dry-run"))
    new = tmp_path / "new"                                        # unlabelled, any depth, odd files beside
    for i, sub in enumerate(("a", "a/b", "c/d/e")):
        noise_image(new / sub / f"img{i}.jpg", i % 3, size=(50, 30))
    (new / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    predict.main([str(new), "--masker", str(masker_out / "checkpoint.pt"),
                  "--classifier", str(cls_out / "checkpoint.pt"), "--out", str(out), "--adapt-bn"])
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["a/b/img1.jpg", "a/img0.jpg", "c/d/e/img2.jpg"]
    assert list(rows[0]) == ["path", "predicted", "A", "B", "review"]
    assert all(abs(float(r["A"]) + float(r["B"]) - 1) < 1e-3 and r["predicted"] in ("A", "B") for r in rows)
    for r in rows:
        mask = np.asarray(Image.open(out / "masks" / r["path"].replace(".jpg", ".png")))
        assert mask.shape == (30, 50) and set(np.unique(mask)) <= {0, 255}
        assert (out / "overlays" / r["path"].replace(".jpg", ".png")).exists()


def test_predict_scores_a_labelled_folder(tmp_path):
    wbc = tiny_wbc(tmp_path / "d")
    train_classifier.main(run_argv(wbc, tmp_path / "c", "--dry-run"))
    scores = predict.main([str(wbc / "WBC_100" / "val" / "data"), "--classifier", str(tmp_path / "c" / "checkpoint.pt"),
                           "--out", str(tmp_path / "pred")])
    assert 0 <= scores["classifier"]["accuracy"] <= 1 and scores["classifier"]["n"] == 2
