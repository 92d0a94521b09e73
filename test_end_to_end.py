"""Both stages end to end on a tiny synthetic set: the masker draws usable masks, the
mask-guided classifier learns well above the majority baseline, evaluate.py agrees."""
import json

import pytest

import evaluate
import predict
import train_classifier
import train_masker
from synth import write_synth


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, scale=0.03, size=64, seed=1, workers=2)
    return root


@pytest.fixture(scope="module")
def masker_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("masker")
    metrics = train_masker.main(["--data", str(tiny), "--split", "100", "--size", "32",
                                 "--pretrain-on", str(tiny / "CAM16"), "--pretrain-epochs", "2", "--epochs", "15", "--batch-size", "8", "--lr", "2e-3",
                                 "--out", str(out), "--device", "cpu"])
    return out, metrics


def test_masker_learns_and_writes_every_mask(tiny, masker_run):
    out, metrics = masker_run
    assert metrics["held_out"]["dice"] > 0.6            # a constant prediction scores ~0 or ~0.3
    n_train = len(list((tiny / "WBC_100" / "train" / "data").glob("*/*.jpg")))
    n_val = len(list((tiny / "WBC_100" / "val" / "data").glob("*/*.jpg")))
    assert len(list((out / "masks" / "train").glob("*/*.png"))) == n_train
    assert len(list((out / "masks" / "val").glob("*/*.png"))) == n_val
    assert not list(out.rglob("*.tmp"))                # every write finished
    scored = evaluate.main([str(out / "checkpoint.pt"), "--data", str(tiny)])
    assert scored["dice"] == pytest.approx(metrics["held_out"]["dice"], abs=1e-6)


def test_classifier_with_masks_beats_majority(tiny, masker_run, tmp_path):
    masks, _ = masker_run
    out = tmp_path / "cls"
    metrics = train_classifier.main(["--data", str(tiny), "--split", "100", "--size", "32", "--alpha", "-1", "1",
                                     "--masks", str(masks / "masks"), "--epochs", "4", "--batch-size", "16", "--lr", "1e-3",
                                     "--out", str(out), "--device", "cpu"])
    assert metrics["accuracy"] > metrics["majority_baseline"] + 0.15   # 0.865 against 0.615 (4 epochs)
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == 1 + metrics["epochs"]
    report = tmp_path / "report.json"
    scored = evaluate.main([str(out / "checkpoint.pt"), "--json", str(report)])
    saved = json.loads(report.read_text())
    assert scored["accuracy"] == pytest.approx(metrics["accuracy"])
    assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class_error", "confusion"} <= saved.keys()


def test_crop_classifier_runs_through_the_masker(tiny, masker_run, tmp_path):
    """The two stages as a user runs them: a `crop` classifier trained on the masker's masks,
    then scored and used on images that come without masks: the masker draws them first."""
    masks, _ = masker_run
    out = tmp_path / "crop"
    metrics = train_classifier.main(["--data", str(tiny), "--split", "100", "--size", "32",
                                     "--mask-mode", "crop", "--masks", str(masks / "masks"),
                                     "--epochs", "7", "--batch-size", "16", "--lr", "1e-3",
                                     "--out", str(out), "--device", "cpu"])
    assert metrics["setting"] == "crop"
    assert metrics["accuracy"] > metrics["majority_baseline"] + 0.1
    val = tiny / "WBC_100" / "val" / "data"
    with pytest.raises(SystemExit, match="--masker"):   # another folder: its masks are unknown
        evaluate.main([str(out / "checkpoint.pt"), "--data", str(tmp_path / "elsewhere")])
    scored = evaluate.main([str(out / "checkpoint.pt"), "--data", str(val),
                            "--masker", str(masks / "checkpoint.pt")])
    assert scored["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.05)
    predicted = predict.main([str(val), "--masker", str(masks / "checkpoint.pt"),
                              "--classifier", str(out / "checkpoint.pt"),
                              "--out", str(tmp_path / "predicted")])
    assert predicted["classifier"]["accuracy"] == pytest.approx(scored["accuracy"], abs=0.02)
    with pytest.raises(SystemExit, match="give --masker"):   # a crop needs a mask
        predict.main([str(val), "--classifier", str(out / "checkpoint.pt"),
                      "--out", str(tmp_path / "no_masker")])
