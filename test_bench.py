"""bench.py end to end at toy settings on the CPU, run as a user runs it: every figure is there, positive and
finite, and the ratios are those of the figures. No timing thresholds: the test machine is shared and noisy."""
import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench

HERE = Path(__file__).resolve().parent
TINY = ["--models", "classifier", "--device", "cpu", "--size", "32", "--batch-size", "2", "--images", "4",
        "--steps", "1", "--epochs", "2", "--workers", "0", "--peak-seconds", "0.1"]
PER_MODEL = ("model_step", "our_loop", "naive_loop", "b_over_a", "b_over_c", "flops_per_image", "peak_share")


def run_bench(args, tmp_path):
    """Run bench.py in a subprocess with one thread each (spinning OpenMP threads slow a busy machine down)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(HERE / "bench.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_writes_every_figure(tmp_path):
    done = run_bench(TINY + ["--json", str(tmp_path / "b.json"), "--out", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved == json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["device"] == "cpu" and saved["size"] == 32 and saved["amp"] in ("bf16", "off")
    assert positive(saved["peak_flops"]) and "unet" not in saved
    r = saved["classifier"]
    assert all(positive(r[k]) for k in PER_MODEL), r
    assert r["b_over_a"] == pytest.approx(r["our_loop"] / r["model_step"])
    assert r["b_over_c"] == pytest.approx(r["our_loop"] / r["naive_loop"])
    assert r["peak_share"] == pytest.approx(r["flops_per_image"] * r["model_step"] / saved["peak_flops"])
    assert (tmp_path / "out" / "bench.txt").read_text().strip().endswith(done.stdout.strip().splitlines()[-1])
    assert not list(tmp_path.glob("runs")) and not list(tmp_path.glob(".cache"))   # trainers wrote in a temp folder


@pytest.mark.parametrize("argv", [["--size", "48"], ["--models", "vit"], ["--images", "8", "--batch-size", "8"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)   # in process: a script's flags are checked before it runs anything
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_imports_only_leaves():
    """A script: it runs the trainers in a subprocess, as a user does, never imports them."""
    tree = ast.parse((HERE / "bench.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in imports if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in imports if isinstance(n, ast.ImportFrom)}
    assert not any(name.split(".")[0].startswith("train_") for name in names), names
    first_other = next(i for i, n in enumerate(tree.body[1:], 1) if not isinstance(n, (ast.Import, ast.ImportFrom)))
    assert all(n in tree.body[:first_other] for n in imports)   # every import at the top


# ------------------------------------------------------------------------ review fixes (issue 19)

@pytest.mark.parametrize("case", ["peak_nan", "peak_inf", "json_folder", "out_file", "batch_zero"])
def test_bad_outputs_and_peak_are_refused_before_any_work(case, tmp_path, capsys):
    """Before: --peak-seconds inf hung in the matmul peak; nan and the output paths failed with a
    traceback after the whole bench."""
    (tmp_path / "file.txt").write_text("keep me")
    argv = {"peak_nan": ["--peak-seconds", "nan"], "peak_inf": ["--peak-seconds", "inf"],
            "json_folder": ["--json", str(tmp_path)],
            "out_file": ["--out", str(tmp_path / "file.txt")],
            "batch_zero": ["--batch-size", "0"]}[case]
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"error: {argv[0]}" in err[-1], err
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as e:
            bench.parse_args(["--out", str(folder)])
    finally:
        folder.chmod(0o755)
    assert e.value.code == 2 and "--out" in capsys.readouterr().err.splitlines()[-1]


def test_guide_times_each_mask_guidance_against_nomask(monkeypatch, tmp_path):
    """(d): one classifier run per GUIDES setting, each flag set one train_classifier.py accepts,
    each speed as a ratio to nomask's; the ground truth's masks copied where a masker's would be."""
    import train_classifier
    for flags in bench.GUIDES.values():
        train_classifier.parse_args([*flags, "--device", "cpu"])   # a typo would exit here
    root = tmp_path / "root"
    work = tmp_path / "work"
    for part in ("train", "val"):
        mask = root / "WBC_100" / part / "mask" / "Basophil" / f"{part}1.png"
        mask.parent.mkdir(parents=True)
        mask.write_bytes(b"png")
    speeds = {"nomask": 10.0, "alpha-1_1": 9.0, "input": 8.0, "crop": 10.0, "rrr0.01": 2.5}
    monkeypatch.setattr(bench, "our_loop", lambda name, root, work, args, setting: speeds[setting])
    lines = []
    assert bench.guide_loops(root, work, None, lines.append) == speeds
    assert lines[4] == "classifier rrr0.01: (d) our loop 2.5 img/s, 0.25x nomask"
    assert (work / "gt_masks" / "val" / "Basophil" / "val1.png").read_bytes() == b"png"
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "unet", "--guide"])
