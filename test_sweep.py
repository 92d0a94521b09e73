"""sweep.py: the statistics and audit helpers by hand, the leakage guard on a planted leak, and a
tiny sweep end to end (in-process): tables, audit, leakage records, resuming, figures."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sweep
import train_classifier
import train_masker
from synth import write_synth


# ---------------------------------------------------------------------------- statistics

def test_paired_comparison_by_hand():
    same = sweep.paired({0: 0.8, 1: 0.9, 2: 0.7}, {0: 0.7, 1: 0.8, 2: 0.6})   # +10 points every seed
    assert same["mean"] == pytest.approx(0.1) and same["std"] == pytest.approx(0.0)
    assert same["verdict"].startswith("beyond seed noise")
    noisy = sweep.paired({0: 0.8, 1: 0.6, 2: 0.75}, {0: 0.7, 1: 0.7, 2: 0.7})  # diffs +.1, -.1, +.05
    assert noisy["mean"] == pytest.approx(0.05 / 3)
    assert noisy["std"] == pytest.approx(math.sqrt(((0.1 - 0.05 / 3) ** 2 + (0.1 + 0.05 / 3) ** 2
                                                    + (0.05 - 0.05 / 3) ** 2) / 2))
    assert noisy["verdict"] == "within seed noise"
    assert sweep.paired({0: 0.8, 5: 0.1}, {0: 0.7})["verdict"].startswith("n < 2")   # only seed 0 is paired


def test_mean_std_and_format():
    assert sweep.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert sweep.fmt([0.5, 0.7]) == "60.0 ± 14.1"
    assert sweep.fmt([0.5, None, float("nan")]) == "50.0"
    assert sweep.fmt([]) == "-"


# ---------------------------------------------------------------------------- audit helpers

def two_smears():
    """Two 32 px images: different background tints, the same dark square cell, and its mask."""
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0] = torch.tensor([200, 100, 50], dtype=torch.uint8)[:, None, None]
    images[1] = torch.tensor([100, 200, 150], dtype=torch.uint8)[:, None, None]
    masks = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    masks[:, :, 10:20, 12:22] = 1
    images[:, :, 10:20, 12:22] = 20
    return images, masks


def test_blank_keeps_only_the_cell_or_only_the_background():
    images, masks = two_smears()
    cell = sweep.blank(images, masks, "cell")
    assert torch.equal(cell[:, :, 10:20, 12:22], images[:, :, 10:20, 12:22])
    outside = cell[:, :, 0, 0]
    assert torch.equal(outside[0], outside[1])                 # one shared colour: no tint survives
    assert outside[0].tolist() == [150, 150, 100]              # the mean of both backgrounds
    back = sweep.blank(images, masks, "background")
    assert torch.equal(back[0], images[0, :, :1, :1].expand(3, 32, 32))   # the cell painted over
    assert torch.equal(back[1], images[1, :, :1, :1].expand(3, 32, 32))
    with pytest.raises(ValueError):
        sweep.blank(images, masks, "nucleus")


def test_cam_inside_mask_by_hand():
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 1, :, :2], maps[0, 1, :, 2:] = 3.0, 1.0          # class 1: 3 inside, 1 outside
    maps[0, 0] = 100.0                                         # another class: ignored
    maps[1, 1] = -1.0                                          # nowhere positive
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :, :2] = 1
    share = sweep.cam_inside(maps, torch.tensor([1, 1]), masks)
    assert share[0].item() == pytest.approx(0.75)
    assert math.isnan(share[1].item())


# ---------------------------------------------------------------------------- leakage guard

def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


@pytest.fixture
def layout(tmp_path):
    """WBC_10 with two images, WBC_100/val with one, generated masks for WBC_10's two images."""
    root = tmp_path / "data"
    png(root / "WBC_10/train/data/A/a1.png", 10)
    png(root / "WBC_10/train/data/A/a2.png", 20)
    png(root / "WBC_100/val/data/A/v1.png", 30)
    gen = tmp_path / "masker" / "masks"
    png(gen / "train/A/a1.png", 255)
    png(gen / "train/A/a2.png", 254)
    (tmp_path / "masker" / "metrics.json").write_text(json.dumps({"split": 10}))
    return root, gen


def test_leakage_guard_passes_a_clean_split(layout):
    root, gen = layout
    record = sweep.check_leakage(root, 10, gen)
    assert record["ok"], record
    assert record["train_images"] == 2 and record["val_images"] == 1 and record["generated_train_masks"] == 2


def test_leakage_guard_finds_a_copied_val_image(layout):
    root, gen = layout
    (root / "WBC_10/train/data/A/copy.png").write_bytes((root / "WBC_100/val/data/A/v1.png").read_bytes())
    png(gen / "train/A/copy.png", 253)
    record = sweep.check_leakage(root, 10, gen)
    assert not record["ok"]
    assert "copy.png" in record["val_in_train_images"][0]


def test_leakage_guard_finds_another_splits_masks(layout, tmp_path):
    root, gen = layout
    png(gen / "train/A/from_wbc100.png", 252)       # a mask for an image WBC_10 doesn't have
    record = sweep.check_leakage(root, 10, gen)
    assert not record["ok"] and record["generated_not_in_split"] == ["A/from_wbc100"]
    (gen / "train/A/from_wbc100.png").unlink()
    (tmp_path / "masker" / "metrics.json").write_text(json.dumps({"split": 100}))
    assert not sweep.check_leakage(root, 10, gen)["ok"]      # the masker ran on another split


# ---------------------------------------------------------------------------- arguments

def test_setting_names_match_train_classifier():
    for name, flags in sweep.SETTINGS.items():
        a = train_classifier.parse_args(flags + ["--split", "10"])
        assert train_classifier.setting_name(a.alpha, a.mask_mode, a.balance) == name


def test_argument_checks(tmp_path):
    args = sweep.parse_args(["--out", str(tmp_path), "--confound", "0.9", "--settings", "alpha1_0", "nomask"])
    assert args.synth and args.settings == ["nomask", "alpha1_0"] and args.masker_losses[0] == "center"
    for bad in (["--settings", "alpha2_0"], ["--confound", "1.5"], ["--size", "48"], ["--synth", "--data", "d"]):
        with pytest.raises(SystemExit):
            sweep.parse_args(["--out", str(tmp_path)] + bad)


def test_synth_marker_refuses_other_parameters(tmp_path):
    (tmp_path / "synth.json").write_text(json.dumps({"scale": 0.1, "size": 128, "seed": 0, "confound": 0.0}))
    with pytest.raises(SystemExit, match="use a new --out"):
        sweep.ensure_synth(tmp_path, 0.1, 128, 0, 0.9)


def test_finished_run_with_other_arguments_is_refused(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"argv": ["--epochs", "3", "--seed", "0"]}))
    sweep.check_same_args(tmp_path, ["--epochs", "3", "--seed", "0"])
    with pytest.raises(SystemExit, match="--epochs '3' -> '5'"):
        sweep.check_same_args(tmp_path, ["--epochs", "5", "--seed", "0"])


# ---------------------------------------------------------------------------- end to end

SWEEP = ["--splits", "100", "--seeds", "0", "--settings", "nomask", "alpha1_0", "--masker-losses", "center",
         "--size", "32", "--epochs", "1", "--masker-epochs", "1", "--pretrain-epochs", "0", "--device", "cpu",
         "--batch-size", "16", "--masker-batch-size", "16", "--scratch", "--in-process"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, scale=0.01, size=32, seed=1, workers=2)   # 10 masks: one masker batch
    out = tmp_path_factory.mktemp("sweep")
    result = sweep.main(["--data", str(root), "--out", str(out)] + SWEEP)
    return root, out, result


def test_tiny_sweep_writes_runs_tables_and_records(tiny_sweep):
    root, out, result = tiny_sweep
    assert result["failures"] == []
    assert len(result["maskers"]) == 1 and len(result["classifiers"]) == 2
    for r in result["classifiers"]:
        folder = out / "classifier" / "WBC_100" / r["setting"] / "seed0"
        assert {"args.json", "log.csv", "metrics.json", "checkpoint.pt", "leakage.json", "audit.json"} <= \
            {p.name for p in folder.iterdir()}
        assert r["leakage"]["ok"] and r["leakage"]["generated_train_masks"] == r["train_images"]
        assert r["audit"]["accuracy"] == pytest.approx(r["accuracy"])   # the audit sees what training scored
        assert r["audit"]["blank_masks"].startswith("ground truth")
        ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert ckpt["slimmed"] and "optimizer" not in ckpt and {"model", "args", "classes"} <= ckpt.keys()
    text = (out / "results.md").read_text()
    for heading in ("## Masker", "## Classifier", "paired by seed", "before/after --balance", "## Shortcut audit"):
        assert heading in text
    assert "| WBC_100 | alpha1_0 - nomask |" in text
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["classifiers"]) == 2 and "preds" not in saved["classifiers"][0]["audit"]


def test_rerun_skips_finished_runs(tiny_sweep, monkeypatch, capsys):
    root, out, _ = tiny_sweep

    def refuse(argv=None):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(train_classifier, "main", refuse)
    monkeypatch.setattr(train_masker, "main", refuse)
    result = sweep.main(["--data", str(root), "--out", str(out), "--no-figures"] + SWEEP)
    assert result["failures"] == []
    assert "2 runs, 2 finished before (skipped), 0 to run" in capsys.readouterr().out
    changed = list(SWEEP)
    changed[changed.index("--epochs") + 1] = "2"
    with pytest.raises(SystemExit, match="--epochs '1' -> '2'"):
        sweep.main(["--data", str(root), "--out", str(out), "--no-figures"] + changed)


def test_figures_are_pngs(tiny_sweep):
    pytest.importorskip("matplotlib")
    _, out, result = tiny_sweep
    names = {p.name for p in result["figures"]}
    assert {"accuracy_vs_split.png", "confusion_WBC_100_nomask.png", "cam_WBC_100_alpha1_0.png"} <= names
    for path in list(result["figures"]) + list(out.glob("classifier/*/*/*/curves.png")):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_figures_skip_cleanly_without_matplotlib(tiny_sweep, monkeypatch, capsys):
    _, out, result = tiny_sweep
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib now raises ImportError
    assert sweep.make_figures(out, result["classifiers"], torch.device("cpu")) == []
    assert "matplotlib is not installed" in capsys.readouterr().out
