"""sweep.py: the statistics, audit helpers and leakage guard by hand, then one tiny sweep end to end (the trainers
as subprocesses): records, resuming, the report from whatever finished (old-format runs too), figures."""
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sweep
from synth import write_synth


# ---------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("t, df, p", [(2.92, 2, 0.1000), (4.303, 2, 0.05), (2.571, 5, 0.05), (12.706, 1, 0.05),
                                      (3.182, 3, 0.05), (2.228, 10, 0.05), (0.0, 4, 1.0)])
def test_t_cdf_gives_the_tables_two_sided_p(t, df, p):
    assert 2 * sweep.t_cdf(-t, df) == pytest.approx(p, abs=2e-4)
    assert sweep.t_cdf(t, df) + sweep.t_cdf(-t, df) == pytest.approx(1.0)   # symmetric
    assert sweep.t_cdf(-1.0, 1) == pytest.approx(0.25)                     # Cauchy: 1/2 + atan(t)/pi


def test_sign_flip_p_by_hand():
    # diffs 1, 2, 3: of the 8 sums +-1 +-2 +-3 only +6 and -6 reach |6|: the smallest p at n = 3
    assert sweep.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # 3, -1, 1 (sum 3): |sum| >= 3 for (3,-1,1), (3,1,1), (3,1,-1) and their mirror images: 6 of 8
    assert sweep.sign_flip_p([3.0, -1.0, 1.0]) == 0.75
    assert sweep.sign_flip_p([0.1, 0.2, 0.3]) == 0.25     # float sums of a tie still count as a tie
    assert math.isnan(sweep.sign_flip_p([]))


def test_paired_by_hand():
    p = sweep.paired({0: 0.8, 1: 0.9, 2: 1.0}, {0: 0.7, 1: 0.7, 2: 0.7})   # diffs 0.1, 0.2, 0.3
    assert p["n"] == 3 and p["mean"] == pytest.approx(0.2) and p["std"] == pytest.approx(0.1)
    t = 0.2 / (0.1 / math.sqrt(3))
    assert p["p_t"] == pytest.approx(1 - t / math.sqrt(t * t + 2))   # df 2: P(|T| < t) = t / sqrt(t^2 + 2)
    assert p["p_perm"] == 0.25
    same = sweep.paired({0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.8})              # +10 points every seed: t ~ inf
    assert same["p_t"] == pytest.approx(0, abs=1e-9) and same["p_perm"] == 0.5
    assert sweep.paired({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})["p_t"] == 0.0   # exactly equal differences: std 0
    one = sweep.paired({0: 0.8, 5: 0.1}, {0: 0.7})                       # only seed 0 is paired
    assert one["n"] == 1 and math.isnan(one["p_t"]) and one["p_perm"] == 1.0


def test_mean_std_and_format():
    assert sweep.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert sweep.fmt([0.5, 0.7]) == "60.0 ± 14.1"
    assert sweep.fmt([0.5, None, float("nan")]) == "50.0"
    assert sweep.fmt([]) == "-"


def run(setting, seed, acc, cell=None):
    return {"split": 10, "setting": setting, "seed": seed, "accuracy": acc, "audit": {"cell_only_agreement": cell}}


def test_comparisons_pair_each_mask_setting_with_both_controls():
    runs = [run(s, k, a + k / 100, 0.5) for s, a in (("nomask", 0.5), ("alpha0_1", 0.6), ("alpha1_0", 0.8),
                                                     ("nomask_balance", 0.5), ("alpha1_0_balance", 0.7)) for k in range(3)]
    rows = sweep.comparisons(runs, "accuracy")
    pairs = {(r["setting"], r["control"]) for r in rows}
    assert pairs == {("alpha0_1", "nomask"), ("alpha1_0", "nomask"), ("alpha1_0", "alpha0_1"),
                     ("alpha1_0_balance", "nomask_balance")}   # no alpha0_1_balance run: no such pair
    vs_clean = next(r for r in rows if r["control"] == "alpha0_1")
    assert vs_clean["mean"] == pytest.approx(0.2) and vs_clean["p_perm"] == 0.25 and vs_clean["p_t"] < 1e-6
    cell = sweep.comparisons(runs, "cell_only_agreement")   # an audit.json number
    assert len(cell) == 4 and all(r["mean"] == 0 and r["p_t"] == 1.0 for r in cell)


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
    assert torch.equal(cell[0, :, 0, 0], cell[1, :, 0, 0])           # one shared colour: no tint survives
    assert cell[0, :, 0, 0].tolist() == [150, 150, 100]              # the mean of both backgrounds
    back = sweep.blank(images, masks, "background")
    for i in range(2):
        assert torch.equal(back[i], images[i, :, :1, :1].expand(3, 32, 32))   # the cell painted over
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
    assert share[0].item() == pytest.approx(0.75) and math.isnan(share[1].item())


def test_locate_finds_a_moved_sweeps_own_files(tmp_path, monkeypatch):
    (tmp_path / "copy" / "data" / "WBC_100").mkdir(parents=True)
    (tmp_path / "results" / "old" / "data").mkdir(parents=True)   # what now lies at the recorded place
    monkeypatch.chdir(tmp_path)
    assert sweep.locate("results/old/data", tmp_path / "copy") == tmp_path / "copy" / "data"
    assert sweep.locate(tmp_path / "elsewhere", tmp_path / "copy") == tmp_path / "elsewhere"   # no tail under OUT


# ---------------------------------------------------------------------------- leakage guard

def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


@pytest.fixture
def layout(tmp_path):
    """WBC_10 with two images, WBC_100/val with one, generated masks for WBC_10's two images."""
    root, gen = tmp_path / "data", tmp_path / "masker" / "masks"
    png(root / "WBC_10/train/data/A/a1.png", 10)
    png(root / "WBC_10/train/data/A/a2.png", 20)
    png(root / "WBC_100/val/data/A/v1.png", 30)
    png(gen / "train/A/a1.png", 255)
    png(gen / "train/A/a2.png", 254)
    (tmp_path / "masker" / "metrics.json").write_text(json.dumps({"split": 10}))
    return root, gen


def test_leakage_guard_passes_a_clean_split(layout):
    record = sweep.check_leakage(*layout[:1], 10, layout[1])
    assert record["ok"] and record["train_images"] == 2 and record["val_images"] == 1, record


def test_leakage_guard_finds_a_planted_val_image(layout):
    root, gen = layout
    (root / "WBC_10/train/data/A/copy.png").write_bytes((root / "WBC_100/val/data/A/v1.png").read_bytes())
    png(gen / "train/A/copy.png", 253)
    record = sweep.check_leakage(root, 10, gen)
    assert not record["ok"] and "copy.png" in record["val_in_train_images"][0]


def test_leakage_guard_finds_another_splits_masks(layout, tmp_path):
    root, gen = layout
    png(gen / "train/A/from_wbc100.png", 252)       # a mask for an image WBC_10 doesn't have
    record = sweep.check_leakage(root, 10, gen)
    assert not record["ok"] and record["generated_not_in_split"] == ["A/from_wbc100"]
    (gen / "train/A/from_wbc100.png").unlink()
    (tmp_path / "masker" / "metrics.json").write_text(json.dumps({"split": 100}))
    assert not sweep.check_leakage(root, 10, gen)["ok"]      # the masker ran on another split


# ---------------------------------------------------------------------------- arguments

def test_argument_checks(tmp_path):
    args = sweep.parse_args(["--out", str(tmp_path), "--confound", "0.9", "--settings", "alpha1_0", "nomask"])
    assert args.synth and args.settings == ["nomask", "alpha1_0"] and args.masker_losses[0] == "center"
    assert args.seeds == [0, 1, 2] and args.masker_seeds == [0, 1, 2]
    for bad in (["--settings", "alpha2_0"], ["--confound", "1.5"], ["--size", "48"], ["--synth", "--data", "d"],
                ["--in-process"], ["--pretrain"], ["--scratch", "--pretrained"]):
        with pytest.raises(SystemExit):
            sweep.parse_args(["--out", str(tmp_path)] + bad)


def test_report_only_reads_the_grid_from_sweep_json(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"splits": [100], "seeds": [4], "settings": ["nomask"]}))
    args = sweep.parse_args(["--out", str(tmp_path), "--report-only"])
    assert args.splits == [100] and args.seeds == [4] and args.settings == ["nomask"]
    assert sweep.parse_args(["--out", str(tmp_path), "--report-only", "--seeds", "1", "2"]).seeds == [1, 2]


def test_masker_argv_pretrains_on_cam16_where_it_has_masks(tmp_path):
    args = sweep.parse_args(["--out", str(tmp_path / "out"), "--splits", "10", "--seeds", "0", "--settings", "nomask",
                             "--masker-losses", "center"])
    (masker, folder, argv), classifier = sweep.grid_runs(args, tmp_path)
    assert "--pretrain-on" not in argv and folder == tmp_path / "out/masker/WBC_10_center_seed0"
    (tmp_path / "CAM16/train/mask").mkdir(parents=True)
    argv = sweep.grid_runs(args, tmp_path)[0][2]
    assert argv[argv.index("--pretrain-on") + 1] == str(tmp_path / "CAM16") and "--batch-size" in argv
    assert classifier[2][classifier[2].index("--masks") + 1].endswith("WBC_10_center_seed0/masks")


def test_synth_marker_refuses_other_parameters(tmp_path):
    (tmp_path / "synth.json").write_text(json.dumps({"scale": 0.1, "size": 128, "seed": 0, "confound": 0.0}))
    with pytest.raises(SystemExit, match="use a new --out"):
        sweep.ensure_synth(tmp_path, 0.1, 128, 0, 0.9)


def test_finished_run_with_other_arguments_is_refused(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"argv": ["--epochs", "3", "--alpha", "-1", "1"]}))
    sweep.check_same_args(tmp_path, ["--alpha", "-1", "1", "--epochs", "3"])   # order does not matter
    with pytest.raises(SystemExit, match="--epochs '3' -> '5'"):
        sweep.check_same_args(tmp_path, ["--epochs", "5", "--alpha", "-1", "1"])


# ---------------------------------------------------------------------------- end to end

SWEEP = ["--splits", "100", "--seeds", "0", "--settings", "alpha1_0", "--masker-losses", "center",
         "--size", "32", "--epochs", "1", "--masker-epochs", "1", "--pretrain-epochs", "0", "--device", "cpu",
         "--batch-size", "16", "--masker-batch-size", "16", "--scratch"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """One masker run and one classifier run on its masks, 43 + 10 images of 32 px: the smallest real work."""
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, scale=0.005, size=32, seed=1, workers=2)
    out = tmp_path_factory.mktemp("sweep")
    return root, out, sweep.main(["--data", str(root), "--out", str(out)] + SWEEP)


def test_tiny_sweep_writes_runs_records_and_tables(tiny_sweep):
    root, out, result = tiny_sweep
    assert result["failures"] == [] and result["missing"] == []
    assert len(result["maskers"]) == 1 and len(result["classifiers"]) == 1
    for r in result["classifiers"]:
        folder = out / "classifier" / "WBC_100" / r["setting"] / "seed0"
        assert {"args.json", "stdout.log", "log.csv", "metrics.json", "checkpoint.pt", "leakage.json", "audit.json"} <= \
            {p.name for p in folder.iterdir()}
        assert r["setting"] == json.loads((folder / "metrics.json").read_text())["setting"]   # the trainer's name too
        assert r["leakage"]["ok"] and r["leakage"]["generated_train_masks"] == r["train_images"]
        assert r["audit"]["accuracy"] == pytest.approx(r["accuracy"])   # the audit sees what training scored
        assert r["audit"]["blank_masks"].startswith("ground truth") and r["audit"]["version"] == sweep.AUDIT_VERSION
        ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert ckpt["slimmed"] and "optimizer" not in ckpt and {"model", "args", "classes"} <= ckpt.keys()
    text = (out / "results.md").read_text()
    for heading in ("## Masker", "## Classifier", "paired by seed", "--balance twin", "## Shortcut audit", "2/2^n"):
        assert heading in text
    assert "| WBC_100 | alpha1_0 | " in text and "| WBC_100 | center | " in text
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["classifiers"]) == 1 and "preds" not in saved["classifiers"][0]["audit"]


def test_rerun_skips_finished_runs_and_refuses_changed_ones(tiny_sweep, capsys):
    root, out, _ = tiny_sweep
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/metrics.json")}
    result = sweep.main(["--data", str(root), "--out", str(out), "--no-figures"] + SWEEP)
    assert result["failures"] == [] and "2 runs, 2 finished before (skipped), 0 to run" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("**/metrics.json")}   # nothing trained again
    changed = list(SWEEP)
    changed[changed.index("--epochs") + 1] = "2"
    with pytest.raises(SystemExit, match="--epochs '1' -> '2'"):
        sweep.main(["--data", str(root), "--out", str(out), "--no-figures"] + changed)


def test_report_only_covers_every_finished_run_once_and_names_the_missing(tiny_sweep, capsys):
    """A run copied in as nomask/seed0 in the old format (metrics.json with a 'compute' dict, checkpoint args with
    old keys, no audit.json) is audited, reported and paired with alpha1_0; the runs asked for but absent are named."""
    _, out, _ = tiny_sweep
    old = out / "classifier" / "WBC_100" / "nomask" / "seed0"
    shutil.copytree(out / "classifier" / "WBC_100" / "alpha1_0" / "seed0", old)
    (old / "audit.json").unlink()
    metrics = json.loads((old / "metrics.json").read_text()) | {"compute": {"channels_last": True}}
    (old / "metrics.json").write_text(json.dumps(metrics))
    ckpt = torch.load(old / "checkpoint.pt", weights_only=True)
    torch.save(ckpt | {"args": ckpt["args"] | {"pretrain": True, "tf32": False}}, old / "checkpoint.pt")
    result = sweep.main(["--out", str(out), "--report-only", "--settings", "nomask", "alpha1_0", "--seeds", "0", "1",
                         "--no-figures"])
    assert result["failures"] == []
    assert sorted(result["missing"]) == ["classifier/WBC_100/alpha1_0/seed1", "classifier/WBC_100/nomask/seed1"]
    saved = json.loads((out / "results.json").read_text())
    folders = [r["folder"] for r in saved["classifiers"]]
    assert len(folders) == 2 == len(set(folders)) and str(old) in folders
    assert json.loads((old / "audit.json").read_text())["accuracy"] == pytest.approx(metrics["accuracy"])
    assert {r["metric"] for r in saved["stats"]["paired"]} == {k for k, _ in sweep.PAIRED_METRICS}
    text = (out / "results.md").read_text()
    assert "missing from the grid: 2" in text and "classifier/WBC_100/nomask/seed1" in text
    assert text.count("| WBC_100 | alpha1_0 - nomask | 1 | +0.0 |") == len(sweep.PAIRED_METRICS)   # the same model
    assert "2 run(s) of the grid missing" in capsys.readouterr().out
    shutil.rmtree(old)


def test_figures_are_pngs(tiny_sweep):
    pytest.importorskip("matplotlib")
    _, out, result = tiny_sweep
    names = {p.name for p in result["figures"]}
    assert {"accuracy_vs_split.png", "confusion_WBC_100_alpha1_0.png", "cam_WBC_100_alpha1_0.png"} <= names
    for path in list(result["figures"]) + list(out.glob("classifier/*/*/*/curves.png")):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_figures_skip_cleanly_without_matplotlib(tiny_sweep, monkeypatch, capsys):
    _, out, result = tiny_sweep
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert sweep.make_figures(out, result["classifiers"], torch.device("cpu")) == []
    assert "matplotlib is not installed" in capsys.readouterr().out
