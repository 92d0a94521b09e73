"""Numbers a user can trust: temperature scaling, calibration metrics by hand, test-time
augmentation over the 8 flips and quarter turns, and the classifier's --holdout (stratified, never
trained on, fits the temperature that evaluate.py and predict.py apply)."""
import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evaluate
import predict
import train_classifier
from data import DataError, d4_undo, d4_views, infer, load_checkpoint, make_batch, save_checkpoint
from losses import calibration_metrics, fit_temperature, reliability_bins
from test_robustness import run_argv, tiny_wbc


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


def test_reliability_bins_count_confidence_and_correct_per_bin():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0])
    count, confidence_sum, correct_sum = reliability_bins(probs, labels, bins=4)
    # top 0.9 -> bin (0.75, 1], right; 0.6, 0.7, 0.55 -> bin (0.5, 0.75], one of them right
    assert count.tolist() == [0, 0, 3, 1]
    assert confidence_sum.tolist() == pytest.approx([0, 0, 0.6 + 0.7 + 0.55, 0.9])
    assert correct_sum.tolist() == [0, 0, 1, 1]


def test_tta_of_an_invariant_classifier_equals_its_plain_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    images = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    plain = infer(model, images, batch_size=16)
    tta = infer(model, images, batch_size=16, tta=True)
    assert tta.shape == (5, 5)
    assert torch.allclose(tta.softmax(1), plain.softmax(1), atol=1e-5)


def test_tta_of_a_pointwise_masker_turns_each_map_back_upright():
    """A 1x1 convolution commutes with flips and turns: after turning each view's map back, the
    8 maps agree with the plain one, pixel for pixel (a map not turned back would not)."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 1, 1)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    plain = infer(model, images, batch_size=16)
    tta = infer(model, images, batch_size=16, tta=True)
    assert tta.shape == (3, 1, 8, 8)
    assert torch.allclose(tta.sigmoid(), plain.sigmoid(), atol=1e-5)


class TopLeftPixel(nn.Module):
    """A model that is not invariant: (B, 2) logits from the top-left pixel's first 2 channels."""

    def forward(self, x):
        return x[:, :2, 0, 0] * 10


def test_tta_of_a_model_that_is_not_invariant_is_the_mean_of_its_views():
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    images[0, 0, 0, 0] = 255                 # a bright top-left: 2 of the 8 views keep it there
    model = TopLeftPixel()
    x, _ = make_batch(images, None, torch.arange(1), "cpu", False)
    expected = model(d4_views(x)).softmax(1).mean(0, keepdim=True)
    tta = infer(model, images, batch_size=8, tta=True).softmax(1)
    plain = infer(model, images, batch_size=8).softmax(1)
    assert torch.allclose(tta, expected, atol=1e-5)
    assert not torch.allclose(tta, plain, atol=1e-2)   # the views differ for this model


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory):
    """A tiny classifier trained with --holdout 0.4, with every training batch's images and the
    split it held out recorded."""
    tmp = tmp_path_factory.mktemp("holdout")
    root = tiny_wbc(tmp / "wbc", n_train=5, n_val=2)
    splits = []
    batches = []
    real_hold_out = train_classifier.hold_out
    real_make_batch = train_classifier.make_batch

    def recording_hold_out(*args):
        splits.append(real_hold_out(*args))
        return splits[-1]

    def recording_make_batch(images, masks, idx, *args, **kw):
        batches.append(images[idx])
        return real_make_batch(images, masks, idx, *args, **kw)

    patch = pytest.MonkeyPatch()
    patch.setattr(train_classifier, "hold_out", recording_hold_out)
    patch.setattr(train_classifier, "make_batch", recording_make_batch)
    out = tmp / "out"
    metrics = train_classifier.main(run_argv(root, out, "--epochs", "2", "--holdout", "0.4"))
    patch.undo()
    return root, out, metrics, splits, batches


def test_holdout_is_stratified_and_never_in_a_training_batch(holdout_run):
    _, _, metrics, splits, batches = holdout_run
    kept, held = splits[0]
    assert torch.bincount(held.labels).tolist() == [2, 2]   # round(0.4 * 5) of each class
    assert len(kept) == 6 and metrics["train_images"] == 6
    trained = torch.cat(batches).flatten(1)                 # every image a training step read
    for image in held.images.flatten(1):
        assert not (trained == image).all(1).any()
    for image in kept.images.flatten(1):                    # ... the recording did see training
        assert (trained == image).all(1).any()
    assert metrics["holdout"]["support"] == {"A": 2, "B": 2}


def test_holdout_temperature_is_stored_and_applied(holdout_run, tmp_path):
    root, out, metrics, _, _ = holdout_run
    temperature = metrics["holdout"]["calibration"]["temperature"]
    assert temperature > 0
    assert load_checkpoint(out / "checkpoint.pt")["temperature"] == temperature
    figure = tmp_path / "reliability.png"
    scored = evaluate.main([str(out / "checkpoint.pt"), "--tta", "--reliability", str(figure)])
    assert scored["calibration"]["temperature"] == temperature and scored["tta"]
    pytest.importorskip("matplotlib")
    assert figure.stat().st_size > 0


def test_predict_applies_the_temperature_and_flags_unsure_images(holdout_run, tmp_path, capsys):
    root, out, _, _, _ = holdout_run
    ckpt = load_checkpoint(out / "checkpoint.pt")
    hot = tmp_path / "hot.pt"
    save_checkpoint(ckpt | {"temperature": 1e6}, hot)   # so soft that every class gets 1/C
    val = root / "WBC_100" / "val" / "data"
    predict.main([str(val), "--classifier", str(hot), "--tta", "--review-below", "0.6",
                  "--out", str(tmp_path / "pred")])
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert all(float(r["A"]) == pytest.approx(0.5, abs=1e-3) for r in rows)
    assert all(r["review"] == "yes" for r in rows)      # top probability 0.5 < 0.6
    assert "4 of 4 image(s) flagged for review (top probability below 0.6)" in capsys.readouterr().out
    predict.main([str(val), "--classifier", str(out / "checkpoint.pt"), "--review-below", "0",
                  "--out", str(tmp_path / "pred")])
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["A"]) + float(r["B"]) == pytest.approx(1, abs=1e-3) for r in rows)
    assert all(r["review"] == "" for r in rows)         # 0: nothing is below it
    assert "flagged" not in capsys.readouterr().out     # no --review-below: no review to report


def test_a_holdout_too_small_to_hold_an_image_is_refused(tmp_path):
    root = tiny_wbc(tmp_path / "wbc", n_train=3, n_val=1)
    with pytest.raises(DataError, match="--holdout 0.1 holds out no image"):   # round(0.1 * 3) = 0
        train_classifier.main(run_argv(root, tmp_path / "out", "--holdout", "0.1"))
    with pytest.raises(SystemExit):
        train_classifier.parse_args(["--holdout", "1"])
    with pytest.raises(SystemExit):
        predict.parse_args(["folder", "--classifier", "c.pt", "--out", "o", "--review-below", "1.5"])


def ece_of_calibrated_models(n_images, repeats=200, seed=0):
    """Mean 15-bin ECE of 5-class models calibrated by construction, each on n_images."""
    generator = torch.Generator().manual_seed(seed)
    eces = []
    for _ in range(repeats):
        probs = (torch.randn(n_images, 5, generator=generator) * 2).softmax(1)
        labels = torch.multinomial(probs, 1, generator=generator)[:, 0]
        eces.append(calibration_metrics(probs, labels)["ece"])
    return sum(eces) / repeats


def test_ece_of_a_calibrated_model_is_far_from_zero_on_a_small_set():
    """ECE is biased upward on few images: tecom300's 60 val images give a perfectly calibrated
    model about 0.14, WBC_100/val's 174 about 0.085; an ECE target of 0.05 needs ~1000 images."""
    assert ece_of_calibrated_models(60) == pytest.approx(0.14, abs=0.015)
    assert ece_of_calibrated_models(174) == pytest.approx(0.085, abs=0.01)
    assert ece_of_calibrated_models(1000, repeats=30) < 0.05
