"""sweep.py and sweep_report.py: the statistics, audit helpers, leakage guard and shard split by hand, then one tiny sweep
end to end as 3 shards (the trainers as subprocesses): records, resuming, --list, the report from whatever finished
(old-format runs too), figures."""
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sweep
import sweep_report
from synth import write_synth


# ---------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("t, df, p", [(2.92, 2, 0.1000), (4.303, 2, 0.05), (2.571, 5, 0.05), (12.706, 1, 0.05),
                                      (3.182, 3, 0.05), (2.228, 10, 0.05), (0.0, 4, 1.0)])
def test_t_cdf_gives_the_tables_two_sided_p(t, df, p):
    assert 2 * sweep_report.t_cdf(-t, df) == pytest.approx(p, abs=2e-4)
    assert sweep_report.t_cdf(t, df) + sweep_report.t_cdf(-t, df) == pytest.approx(1.0)   # symmetric
    assert sweep_report.t_cdf(-1.0, 1) == pytest.approx(0.25)                     # Cauchy: 1/2 + atan(t)/pi


def test_sign_flip_p_by_hand():
    # diffs 1, 2, 3: of the 8 sums +-1 +-2 +-3 only +6 and -6 reach |6|: the smallest p at n = 3
    assert sweep_report.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # 3, -1, 1 (sum 3): |sum| >= 3 for (3,-1,1), (3,1,1), (3,1,-1) and their mirror images: 6 of 8
    assert sweep_report.sign_flip_p([3.0, -1.0, 1.0]) == 0.75
    assert sweep_report.sign_flip_p([0.1, 0.2, 0.3]) == 0.25     # float sums of a tie still count as a tie
    assert math.isnan(sweep_report.sign_flip_p([]))


def test_paired_by_hand():
    p = sweep_report.paired({0: 0.8, 1: 0.9, 2: 1.0}, {0: 0.7, 1: 0.7, 2: 0.7})   # diffs 0.1, 0.2, 0.3
    assert p["n"] == 3 and p["mean"] == pytest.approx(0.2) and p["std"] == pytest.approx(0.1)
    t = 0.2 / (0.1 / math.sqrt(3))
    assert p["p_t"] == pytest.approx(1 - t / math.sqrt(t * t + 2))   # df 2: P(|T| < t) = t / sqrt(t^2 + 2)
    assert p["p_perm"] == 0.25
    same = sweep_report.paired({0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.8})              # +10 points every seed: t ~ inf
    assert same["p_t"] == pytest.approx(0, abs=1e-9) and same["p_perm"] == 0.5
    one = sweep_report.paired({0: 0.8, 5: 0.1}, {0: 0.7})                       # only seed 0 is paired
    assert one["n"] == 1 and math.isnan(one["p_t"]) and one["p_perm"] == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04: x3 = 0.03, x2 = 0.06, x1 = 0.04 -> kept at 0.06 (never below the one before)
    assert sweep_report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert sweep_report.holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])      # 2 x 0.4 = 0.8; then 0.5 -> 0.8
    assert sweep_report.holm([0.9, float("nan")]) == pytest.approx([1.0, 1.0])   # NaN counts as 1


def test_primary_tests_are_the_guidance_modes_minus_nomask_in_val_accuracy():
    def run(setting, seed, accuracy):
        return {"split": 100, "setting": setting, "seed": seed, "accuracy": accuracy}
    gains = {"nomask": 0.0, "input": 0.2, "crop": 0.1, "nomask_rrr0.01": 0.0, "alpha-1_1": 0.3}
    noise = [0.0, 0.02, -0.01]
    runs = [run(s, k, 0.5 + g + n * (1 + len(s) % 3)) for s, g in gains.items() for k, n in enumerate(noise)]
    stats = sweep_report.comparisons(runs, "accuracy")
    primary = sweep_report.primary_tests(stats)
    assert sorted(r["setting"] for r in primary) == ["crop", "input", "nomask_rrr0.01"]   # not alpha-1_1
    raw = [r["p_t"] for r in primary]
    assert [r["p_holm"] for r in primary] == pytest.approx(sweep_report.holm(raw))
    assert all(r["p_holm"] >= r["p_t"] for r in primary if not math.isnan(r["p_t"]))


def test_mean_std_and_format():
    assert sweep_report.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert sweep_report.fmt([0.5, 0.7]) == "60.0 ± 14.1"
    assert sweep_report.fmt([0.5, None, float("nan")]) == "50.0"
    assert sweep_report.fmt([]) == "-"


def run(setting, seed, acc, cell=None):
    return {"split": 10, "setting": setting, "seed": seed, "accuracy": acc, "audit": {"cell_only_agreement": cell}}


def test_comparisons_pair_each_mask_setting_with_both_controls():
    runs = [run(s, k, a + k / 100, 0.5) for s, a in (("nomask", 0.5), ("alpha0_1", 0.6), ("alpha1_0", 0.8),
                                                     ("nomask_balance", 0.5), ("alpha1_0_balance", 0.7)) for k in range(3)]
    rows = sweep_report.comparisons(runs, "accuracy")
    pairs = {(r["setting"], r["control"]) for r in rows}
    assert pairs == {("alpha0_1", "nomask"), ("alpha1_0", "nomask"), ("alpha1_0", "alpha0_1"),
                     ("alpha1_0_balance", "nomask_balance")}   # no alpha0_1_balance run: no such pair
    vs_clean = next(r for r in rows if r["control"] == "alpha0_1")
    assert vs_clean["mean"] == pytest.approx(0.2) and vs_clean["p_perm"] == 0.25
    assert math.isnan(vs_clean["p_t"])   # +0.2 at every seed: zero variance, t undefined
    cell = sweep_report.comparisons(runs, "cell_only_agreement")   # an audit.json number
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
    cell = sweep_report.blank(images, masks, "cell")
    assert torch.equal(cell[:, :, 10:20, 12:22], images[:, :, 10:20, 12:22])
    assert torch.equal(cell[0, :, 0, 0], cell[1, :, 0, 0])           # one shared colour: no tint survives
    assert cell[0, :, 0, 0].tolist() == [150, 150, 100]              # the mean of both backgrounds
    back = sweep_report.blank(images, masks, "background")
    for i in range(2):
        assert torch.equal(back[i], images[i, :, :1, :1].expand(3, 32, 32))   # the cell painted over
    with pytest.raises(ValueError):
        sweep_report.blank(images, masks, "nucleus")


def test_cam_inside_mask_by_hand():
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 1, :, :2], maps[0, 1, :, 2:] = 3.0, 1.0          # class 1: 3 inside, 1 outside
    maps[0, 0] = 100.0                                         # another class: ignored
    maps[1, 1] = -1.0                                          # nowhere positive
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :, :2] = 1
    share = sweep_report.cam_inside(maps, torch.tensor([1, 1]), masks)
    assert share[0].item() == pytest.approx(0.75) and math.isnan(share[1].item())


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
    assert args.shard == (0, 1) and not args.sharded and args.stage == "all"
    args = sweep.parse_args(["--out", str(tmp_path), "--shard", "2/3", "--stage", "masker"])
    assert args.shard == (2, 3) and args.sharded
    for bad in (["--settings", "alpha2_0"], ["--confound", "1.5"], ["--size", "48"], ["--synth", "--data", "d"],
                ["--in-process"], ["--pretrain"], ["--scratch"], ["--weights", "w.pt", "--pretrained"],
                ["--shard", "3/3"], ["--shard", "1"], ["--shard", "-1/3"], ["--stage", "audit"],
                ["--jobs-per-device", "0"], ["--devices", "cpu", "tpu"]):
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


# ---------------------------------------------------------------------------- shards and devices

def small_grid(out, *more):
    return sweep.parse_args(["--out", str(out), "--splits", "100", "10", "--seeds", "0", "1", "--settings", "nomask",
                             "alpha1_0"] + list(more))


def test_shards_split_the_grid_by_its_order_not_by_what_has_finished(tmp_path):
    runs = sweep.grid_runs(small_grid(tmp_path))   # 2 splits x 2 losses x 2 seeds maskers, then 2 x 2 x 2 classifiers
    owner = sweep.shard_of(runs, 3)
    assert len(runs) == 16 and list(owner) == [f for _, f, _ in runs] and list(owner.values()) == [k % 3 for k in range(16)]
    assert sorted(Counter(owner.values()).values()) == [5, 5, 6]                # every run in one shard, balanced
    for _, folder, _ in runs[::2]:                                              # half of them finish
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text("{}")
    (tmp_path / "sweep.json").write_text(json.dumps({"splits": [100, 10]}))   # for --report-only
    assert sweep.shard_of(sweep.grid_runs(small_grid(tmp_path, "--report-only")), 3) == owner
    assert sweep.shard_of(runs, 1) == dict.fromkeys(owner, 0)


def test_devices_run_k_at_once_each_maskers_first(tmp_path, monkeypatch):
    """execute() with a stand-in for run_one: 2 devices x 2 jobs hold 4 runs at once, never 3 on one device, and no
    classifier starts before every masker has ended; failures come back."""
    args = small_grid(tmp_path, "--splits", "100", "--jobs-per-device", "2")
    args.devices = ["cuda:0", "cuda:1"]   # parse_args refuses them without CUDA; run_one is a stand-in
    held, events, lock, together = Counter(), [], threading.Lock(), threading.Barrier(4, timeout=20)

    def run_one(script, folder, argv, device, *_):
        with lock:
            held[device] += 1
            events.append(("start", script, device, held[device]))
        together.wait()   # all 4 of a stage at once, or BrokenBarrierError
        time.sleep(0.05)
        with lock:
            held[device] -= 1
            events.append(("end", script, device, held[device]))
        return (str(folder), "boom") if "seed1" in str(folder) else None
    monkeypatch.setattr(sweep, "run_one", run_one)
    runs = sweep.grid_runs(args)
    failures = sweep.execute(runs, args, tmp_path, sweep.shard_of(runs, 1))
    assert sorted(f for f, _ in failures) == sorted(str(f) for _, f, _ in runs if "seed1" in str(f))
    assert max(n for kind, _, _, n in events if kind == "start") == 2
    assert Counter(d for kind, _, d, _ in events if kind == "start") == {"cuda:0": 4, "cuda:1": 4}
    last_masker = max(i for i, e in enumerate(events) if e[1] == "train_masker.py")
    assert all(e[1] == "train_classifier.py" for e in events[last_masker + 1:]) and events[last_masker][0] == "end"
    assert len(events) == 16 and all(e[1] == "train_masker.py" for e in events[:8])


def test_list_prints_each_run_once_across_shards(tmp_path, synth_root, capsys):
    lines = {}
    for k in range(3):
        assert sweep.main(["--data", str(synth_root), "--out", str(tmp_path), "--shard", f"{k}/3", "--list"] + SWEEP2) \
            == {"failures": [], "report": None}
        lines[k] = capsys.readouterr().out.splitlines()
    argvs = {k: [shlex.split(line) for line in v] for k, v in lines.items()}
    outs = [a[a.index("--out") + 1] for v in argvs.values() for a in v]
    grid = [str(f) for _, f, _ in sweep.grid_runs(sweep.parse_args(["--out", str(tmp_path)] + SWEEP2))]
    assert sorted(outs) == sorted(grid) and len(set(outs)) == 3 == len(outs)
    assert [len(v) for v in argvs.values()] == [1, 1, 1] and argvs[0][0][:2] == ["python", "train_masker.py"]
    assert all(a[1] == "train_classifier.py" and "--masks" in a for a in argvs[1] + argvs[2])
    assert not (tmp_path / "masker").exists()   # listed, not run
    assert not any("--weights" in a or "--pretrained" in a for v in argvs.values() for a in v)   # ImageNet if asked
    assert json.loads((tmp_path / "sweep.json").read_text())["init"] == "from scratch"
    sweep.main(["--data", str(synth_root), "--out", str(tmp_path), "--stage", "classifier", "--list"] + SWEEP2)
    assert [shlex.split(line)[1] for line in capsys.readouterr().out.splitlines()] == ["train_classifier.py"] * 2




# ---------------------------------------------------------------------------- end to end

SWEEP2 = ["--splits", "100", "--seeds", "0", "--masker-seeds", "0", "--settings", "alpha1_0", "nomask", "--masker-losses",
          "center", "--size", "32", "--epochs", "1", "--masker-epochs", "1", "--pretrain-epochs", "0", "--device", "cpu",
          "--batch-size", "16", "--masker-batch-size", "16"]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """43 + 10 synthetic images of 32 px: the smallest real work."""
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, scale=0.005, size=32, seed=1, workers=2)
    return root


@pytest.fixture(scope="module")
def tiny_sweep(synth_root, tmp_path_factory):
    """A 3-run grid (the masker, then nomask and alpha1_0 on its masks) as 3 shards: shard 1 first, in process, before
    any masker exists; then shard 0 (the masker's owner); then shards 1 and 2 at once, 1 through --devices. Each shard
    a `python sweep.py` subprocess; then the report of everything: sweep_report.main([OUT])."""
    out = tmp_path_factory.mktemp("sweep")
    early = sweep.main(["--data", str(synth_root), "--out", str(out), "--shard", "1/3"] + SWEEP2)
    shard = [sys.executable, str(HERE / "sweep.py"), "--data", str(synth_root), "--out", str(out)] + SWEEP2
    done = {0: subprocess.run(shard + ["--shard", "0/3"], cwd=HERE, capture_output=True, text=True)}
    both = {k: subprocess.Popen(shard + ["--shard", f"{k}/3"] + more, cwd=HERE, stdout=subprocess.PIPE, text=True,
                                stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})   # 2 runs, 2 cores
            for k, more in ((1, ["--devices", "cpu", "--jobs-per-device", "2"]), (2, []))}
    logs = {0: done[0].stdout + done[0].stderr} | {k: p.communicate()[0] for k, p in both.items()}
    codes = {0: done[0].returncode} | {k: p.returncode for k, p in both.items()}
    status = sweep_report.main([str(out)])
    return synth_root, out, early, logs, codes, status, json.loads((out / "results.json").read_text())


def test_shards_train_each_run_once_and_wait_for_their_masker(tiny_sweep):
    _, out, early, logs, codes, _, _ = tiny_sweep
    masker = out / "masker" / "WBC_100_center_seed0"
    assert early["report"] is None and early["failures"] == [
        (str(out / "classifier/WBC_100/nomask/seed0"), f"masker {masker} not finished yet (owned by shard 0/3); rerun later")]
    assert codes == {0: 0, 1: 0, 2: 0}, logs
    trained = Counter(line.split(" -> ")[1] for log in logs.values() for line in log.splitlines() if " -> " in line)
    assert trained == Counter({str(masker): 1, str(out / "classifier/WBC_100/nomask/seed0"): 1,
                               str(out / "classifier/WBC_100/alpha1_0/seed0"): 1}), logs
    assert "1 runs (shard 2/3, stage all): 1 to run, the rest finished" in logs[2]
    assert all("python sweep_report.py" in log and "# Sweep results" not in log for log in logs.values())


def test_tiny_sweep_writes_runs_records_and_tables(tiny_sweep):
    root, out, _, _, _, status, saved = tiny_sweep
    assert status == 0 and saved["missing"] == [] and len(saved["maskers"]) == 1
    assert sorted(r["folder"] for r in saved["classifiers"]) == sorted(
        str(out / "classifier/WBC_100" / s / "seed0") for s in ("alpha1_0", "nomask"))   # each run once
    assert sorted(saved["config"]["runs"]) == sorted(
        str(f.relative_to(out)) for _, f, _ in sweep.grid_runs(sweep.parse_args(["--out", str(out)] + SWEEP2)))
    for r in saved["classifiers"]:
        folder = Path(r["folder"])
        assert {"args.json", "stdout.log", "log.csv", "metrics.json", "checkpoint.pt", "leakage.json", "audit.json"} <= \
            {p.name for p in folder.iterdir()}
        assert r["setting"] == json.loads((folder / "metrics.json").read_text())["setting"]   # the trainer's name too
        assert r["leakage"]["ok"] and r["leakage"]["generated_train_masks"] == r["train_images"]
        assert r["audit"]["accuracy"] == pytest.approx(r["accuracy"])   # the audit sees what training scored
        assert r["audit"]["blank_masks"].startswith("ground truth") and r["audit"]["version"] == sweep_report.AUDIT_VERSION
        assert "--device" in (argv := json.loads((folder / "args.json").read_text())["argv"]) and "cpu" in argv
        ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert ckpt["slimmed"] and "optimizer" not in ckpt and {"model", "args", "classes"} <= ckpt.keys()
    text = (out / "results.md").read_text()
    for heading in ("## Masker", "## Classifier", "paired by seed", "--balance twin", "## Shortcut audit", "2/2^n"):
        assert heading in text
    assert "| WBC_100 | alpha1_0 | " in text and "| WBC_100 | center | " in text and "| WBC_100 | alpha1_0 - nomask |" in text
    assert "preds" not in saved["classifiers"][0]["audit"]


def test_rerun_skips_finished_runs_whatever_their_flags(tiny_sweep, capsys):
    root, out, *_ = tiny_sweep
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/metrics.json")}
    result = sweep.main(["--data", str(root), "--out", str(out), "--shard", "0/1"] + SWEEP2)   # a shard: no report
    assert result == {"failures": [], "report": None}
    assert "3 runs (shard 0/1, stage all): 0 to run, the rest finished" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("**/metrics.json")}   # nothing trained again
    for k in range(3):   # nothing left to list
        sweep.main(["--data", str(root), "--out", str(out), "--shard", f"{k}/3", "--list"] + SWEEP2)
        assert capsys.readouterr().out == ""
    changed = list(SWEEP2)
    changed[changed.index("--epochs") + 1] = "2"   # a finished run is skipped, not compared
    assert sweep.main(["--data", str(root), "--out", str(out), "--shard", "0/1"] + changed)["failures"] == []
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("**/metrics.json")}


def test_report_only_covers_every_finished_run_once_and_names_the_missing(tiny_sweep, capfd):
    """A run copied in as alpha0_1/seed0 in the old format (metrics.json with a 'compute' dict, checkpoint args with
    old keys, no audit.json) is audited, reported and paired with alpha1_0; the runs asked for but absent are named.
    sweep.py --report-only runs `python sweep_report.py OUT --grid ...`."""
    _, out, *_ = tiny_sweep
    old = out / "classifier" / "WBC_100" / "alpha0_1" / "seed0"
    shutil.copytree(out / "classifier" / "WBC_100" / "alpha1_0" / "seed0", old)
    (old / "audit.json").unlink()
    metrics = json.loads((old / "metrics.json").read_text()) | {"compute": {"channels_last": True}}
    (old / "metrics.json").write_text(json.dumps(metrics))
    ckpt = torch.load(old / "checkpoint.pt", weights_only=True)
    torch.save(ckpt | {"args": ckpt["args"] | {"pretrain": True, "tf32": False}}, old / "checkpoint.pt")
    result = sweep.main(["--out", str(out), "--report-only", "--settings", "nomask", "alpha0_1", "alpha1_0", "--seeds", "0",
                         "1", "--no-figures"])
    assert result == {"failures": [], "report": 0}
    missing = [f"classifier/WBC_100/{s}/seed1" for s in ("nomask", "alpha0_1", "alpha1_0")]
    saved = json.loads((out / "results.json").read_text())
    assert saved["missing"] == missing
    folders = [r["folder"] for r in saved["classifiers"]]
    assert len(folders) == 3 == len(set(folders)) and str(old) in folders
    assert json.loads((old / "audit.json").read_text())["accuracy"] == pytest.approx(metrics["accuracy"])
    assert {r["metric"] for r in saved["stats"]["paired"]} == {k for k, _ in sweep_report.PAIRED_METRICS}
    text = (out / "results.md").read_text()
    assert "missing from the grid: 3" in text and missing[1] in text
    assert text.count("| WBC_100 | alpha1_0 - alpha0_1 | 1 | +0.0 |") == len(sweep_report.PAIRED_METRICS)   # one model
    assert "3 run(s) of the grid missing" in capfd.readouterr().out
    shutil.rmtree(old)


def test_figures_are_pngs(tiny_sweep):
    pytest.importorskip("matplotlib")
    saved = tiny_sweep[-1]
    names = {Path(p).name for p in saved["figures"]}
    assert {"accuracy_vs_split.png", "confusion_WBC_100_alpha1_0.png", "cam_WBC_100_nomask.png"} <= names
    assert not any(name.startswith(("misclassified", "curves")) for name in names)
    for path in saved["figures"]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_figures_skip_cleanly_without_matplotlib(tiny_sweep, monkeypatch, capsys):
    out = tiny_sweep[1]
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert sweep_report.make_figures(out, tiny_sweep[-1]["classifiers"], torch.device("cpu")) == []
    assert "matplotlib is not installed" in capsys.readouterr().out


# ------------------------------------------------------------------------ review fixes (issue 19)

def test_paired_t_with_equal_differences_is_undefined_not_zero():
    """Zero variance: t = mean/0 has no distribution to read a p from; p = 0 would claim a certainty
    that 2 or 3 seeds never give. Equal non-zero differences: NaN (the table prints '-', says why);
    all differences 0: p = 1."""
    equal = sweep_report.paired({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert equal["std"] == 0 and equal["mean"] == 1.0 and math.isnan(equal["p_t"])
    assert equal["p_perm"] == 0.25   # the exact test still answers
    assert sweep_report.paired({0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})["p_t"] == 1.0
    table = sweep_report.paired_tables([{"metric": "accuracy", "split": 10, "setting": "alpha1_0",
                                         "control": "nomask"} | equal])
    assert "| WBC_10 | alpha1_0 - nomask | 3 | +100.0 | 0.0 | - | 0.250 |" in table


@pytest.mark.parametrize("case", ["missing", "corrupt", "foreign_list", "foreign_dict"])
def test_report_only_without_a_sweep_json_is_one_line(tmp_path, capsys, case):
    """Before: no sweep.json gave a report of the default grid in any folder; a corrupt one a
    traceback."""
    content = {"missing": None, "corrupt": '{"splits": [10', "foreign_list": "[1, 2]",
               "foreign_dict": json.dumps({"device": "cpu", "peak_flops": 1e9})}[case]   # bench
    if content is not None:
        (tmp_path / "sweep.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        sweep.parse_args(["--out", str(tmp_path), "--report-only"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--report-only" in err[-1]
    assert str(tmp_path / "sweep.json") in err[-1]
    assert not (tmp_path / "results.md").exists()
    with pytest.raises(sweep_report.DataError, match="sweep.json"):   # the report alone says it too
        sweep_report.main([str(tmp_path), "--no-figures"])


def resave(src, dst):
    """The same pixels in another file format: other bytes, same image."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.save(dst)


def test_leakage_guard_compares_pixels_and_covers_pretrain_roots(layout, tmp_path):
    root, gen = layout
    resave(root / "WBC_100/val/data/A/v1.png", root / "WBC_10/train/data/A/resaved.bmp")
    png(gen / "train/A/resaved.png", 253)
    record = sweep.check_leakage(root, 10, gen, size=8)
    assert not record["ok"] and "resaved.bmp" in record["val_in_train_images"][0], record
    (root / "WBC_10/train/data/A/resaved.bmp").unlink()
    (gen / "train/A/resaved.png").unlink()
    assert sweep.check_leakage(root, 10, gen, size=8)["ok"]
    cam = tmp_path / "cam"   # the masker pretrained on a root that holds a val image
    resave(root / "WBC_100/val/data/A/v1.png", cam / "train/data/X/p1.bmp")
    png(cam / "train/mask/X/p1.png", 255)
    metrics = {"split": 10, "pretrain_on": [str(cam)]}
    (tmp_path / "masker" / "metrics.json").write_text(json.dumps(metrics))
    record = sweep.check_leakage(root, 10, gen, size=8)
    assert not record["ok"] and "p1.bmp" in record["val_in_pretrain_images"][0], record


@pytest.fixture
def leaky_wbc(tmp_path):
    """test_robustness's tiny WBC_100 with one val image re-saved as a BMP into train."""
    from test_robustness import tiny_wbc
    root = tiny_wbc(tmp_path / "d")
    val = root / "WBC_100/val/data/A/val_A_0.png"
    resave(val, root / "WBC_100/train/data/A/copy.bmp")
    assert (root / "WBC_100/train/data/A/copy.bmp").read_bytes() != val.read_bytes()
    resave(root / "WBC_100/val/mask/A/val_A_0.png", root / "WBC_100/train/mask/A/copy.png")
    return root, val


@pytest.mark.parametrize("script", ["train_classifier", "train_masker", "pretrain"])
def test_trainers_refuse_a_val_image_in_training(leaky_wbc, tmp_path, script):
    from test_robustness import run_argv, tiny_wbc
    import train_classifier
    import train_masker
    root, val = leaky_wbc
    copy = root / "WBC_100/train/data/A/copy.bmp"
    if script == "pretrain":   # a clean dataset, a --pretrain-on root that holds the val image
        pre = tmp_path / "pre"
        resave(val, pre / "train/data/X/p.bmp")
        resave(root / "WBC_100/val/mask/A/val_A_0.png", pre / "train/mask/X/p.png")
        resave(root / "WBC_100/train/data/B/train_B_0.png", pre / "train/data/X/q.png")
        resave(root / "WBC_100/train/mask/B/train_B_0.png", pre / "train/mask/X/q.bmp")
        copy.unlink()
        copy = pre / "train/data/X/p.bmp"
    main = train_classifier.main if script == "train_classifier" else train_masker.main
    extra = ["--pretrain-on", str(tmp_path / "pre")] if script == "pretrain" else []
    with pytest.raises(sweep.DataError) as e:
        main(run_argv(root, tmp_path / "out", "--dry-run", *extra))
    message = str(e.value)
    assert str(copy) in message and str(val) in message and "\n" not in message, message


def test_audit_blanks_what_the_classifier_sees():
    """--white-balance: blanking the balanced image (the classifier's input), not the raw one; a
    mask-channel model's 4th channel is emptied with the cell in the background-only view."""
    images, masks = two_smears()
    images[:, :, :4] = 255   # a bright strip: white balance divides by it
    images[0, 0, :4] = 200   # a yellowish lamp on image 0
    seen = (sweep_report.white_balance(images.float() / 255) * 255).round().to(torch.uint8)
    views = sweep_report.blanked_views(images, masks, masks, white=True)
    assert torch.equal(views["full"][0], seen) and torch.equal(views["full"][1], masks)
    assert torch.equal(views["cell"][0], sweep_report.blank(seen, masks, "cell"))
    assert torch.equal(views["background"][0], sweep_report.blank(seen, masks, "background"))
    assert torch.equal(views["cell"][1], masks) and not views["background"][1].any()
    plain = sweep_report.blanked_views(images, masks, None, white=False)
    assert torch.equal(plain["cell"][0], sweep_report.blank(images, masks, "cell"))
    assert plain["full"][1] is None and plain["background"][1] is None


MASKER_ONLY = SWEEP2 + ["--stage", "masker"]


def test_a_second_sweep_on_one_out_is_refused_before_it_touches_anything(tmp_path, synth_root):
    out = tmp_path / "out"
    first = sweep.parse_args(["--data", str(synth_root), "--out", str(out)] + MASKER_ONLY)
    sweep.lock_out(first)   # a live sweep (this process holds its lock)
    try:
        for more in ([], ["--shard", "0/2"]):
            with pytest.raises(sweep.DataError, match="another sweep"):
                sweep.main(["--data", str(synth_root), "--out", str(out)] + MASKER_ONLY + more)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]   # no sweep.json, no run folder
    finally:
        sweep.release_locks()
    shard = lambda k: sweep.parse_args(["--out", str(out), "--shard", k] + SWEEP2)   # noqa: E731
    sweep.lock_out(shard("0/2"))   # shards of one N side by side; one twice or another N: no
    try:
        assert sweep.lock_out(shard("1/2")) is None
        for bad in ("0/2", "0/3"):
            with pytest.raises(sweep.DataError, match=f"--shard {bad}"):
                sweep.lock_out(shard(bad))
    finally:
        sweep.release_locks()


def test_a_rerun_leaves_a_live_run_alone(tmp_path, synth_root):
    """A trainer still running (its folder locked: here by this process) is neither restarted nor
    marked failed, and its log is not truncated."""
    import data
    out = tmp_path / "out"
    masker = out / "masker" / "WBC_100_center_seed0"
    data.claim_folder(masker)
    try:
        (masker / "stdout.log").write_text("epoch 1 ...\n")
        (masker / "args.json").write_text(json.dumps({"script": "train_masker.py", "argv": []}))
        argv = ["--data", str(synth_root), "--out", str(out), "--shard", "0/1"] + MASKER_ONLY
        result = sweep.main(argv)
    finally:
        data.HELD.pop().close()
    assert result["failures"] == [(str(masker), sweep.STILL_RUNNING)]
    assert (masker / "stdout.log").read_text() == "epoch 1 ...\n"
    assert "ok" not in json.loads((masker / "args.json").read_text())


def test_sigterm_stops_the_sweep_and_its_trainers(tmp_path, synth_root):
    out = tmp_path / "out"
    slow = MASKER_ONLY + ["--masker-epochs", "500"]   # minutes: only a signal ends it in time
    cmd = [sys.executable, str(HERE / "sweep.py"), "--data", str(synth_root), "--out", str(out)]
    proc = subprocess.Popen(cmd + slow, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    masker = out / "masker" / "WBC_100_center_seed0"
    deadline = time.time() + 60
    while not sweep.is_live(masker) and time.time() < deadline:   # the trainer holds its folder
        time.sleep(0.2)
    assert sweep.is_live(masker), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("error: stopped by SIGTERM"), stderr
    assert not sweep.is_live(masker)   # the trainer ended before the sweep did
    record = json.loads((masker / "args.json").read_text())
    assert record["stopped"] == "SIGTERM" and "ok" not in record   # stopped, not failed
    assert not (out / "results.md").exists()


def test_repeated_grid_values_give_one_run_a_folder(tmp_path):
    args = sweep.parse_args(["--out", str(tmp_path), "--splits", "10", "10", "--seeds", "0", "0",
                             "--settings", "nomask", "nomask", "--masker-losses", "bce", "bce"])
    folders = [f for _, f, _ in sweep.grid_runs(args)]
    assert len(folders) == len(set(folders)) == 3   # 2 maskers (center, bce), 1 classifier


def test_report_names_a_damaged_metrics_json(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"splits": [10], "settings": ["nomask"]}))
    run = tmp_path / "classifier/WBC_10/nomask/seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{bad")
    with pytest.raises(sweep_report.DataError, match="metrics.json: not valid JSON"):
        sweep_report.main([str(tmp_path), "--no-figures"])


def test_audit_reports_chance_corrected_agreement(tiny_sweep):
    """Raw 'keeps pred' has no chance baseline: the audit adds Cohen's kappa and the classes the
    model falls back on when it sees only background."""
    _, out, _, _, _, _, saved = tiny_sweep
    for r in saved["classifiers"]:
        audit = r["audit"]
        counts = audit["background_only_predicted"]
        assert sum(counts) == audit["n"]
        assert audit["background_only_top_share"] == pytest.approx(max(counts) / audit["n"])
        assert -1 <= audit["background_only_kappa"] <= 1
        assert -1 <= audit["cell_only_kappa"] <= 1
    text = (out / "results.md").read_text()
    assert "background-only kappa" in text and "Cohen's kappa" in text


def test_sweep_table_pools_seeds_of_each_run_and_target(tmp_path, capsys):
    import sweep_table
    scores = {("crop", 0): 0.5, ("crop", 1): 0.7, ("nomask", 0): 0.4}
    for (mode, seed), balanced in scores.items():
        run = tmp_path / f"synth_{mode}_{seed}"
        run.mkdir()
        record = {"accuracy": 0.9, "balanced_accuracy": balanced,
                  "calibration": {"before": {"ece": 0.2}, "after": {"ece": 0.05}}}
        (run / "on_tecom300.json").write_text(json.dumps(record))
        (run / "metrics.json").write_text("{}")                   # a trainer's without --holdout
    held = {"accuracy": 0.1, "holdout": {"accuracy": 0.8, "balanced_accuracy": 0.6}}
    (tmp_path / "synth_crop_1" / "metrics.json").write_text(json.dumps(held))
    (tmp_path / "masker_synth").mkdir()                           # no seed: not a run
    (tmp_path / "masker_synth" / "on_x.json").write_text("{}")
    text = sweep_table.main([str(tmp_path)])
    lines = text.splitlines()
    assert lines[0] == "| run | scored | seeds | accuracy % | balanced % | ECE | ECE, temperature |"
    assert lines[2] == "| synth_crop | holdout | 1 | 80.0 | 60.0 | - | - |"   # not val's 0.1
    assert lines[3] == "| synth_crop | on_tecom300 | 2 | 90.0 ± 0.0 | 60.0 ± 14.1 | 0.200 ± 0.000 | 0.050 ± 0.000 |"
    assert lines[4] == "| synth_nomask | on_tecom300 | 1 | 90.0 | 40.0 | 0.200 | 0.050 |"
    assert len(lines) == 5 and (tmp_path / "table.md").read_text() == text + "\n"
