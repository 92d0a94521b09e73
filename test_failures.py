"""Fail loudly: no run exits 0 with wrong results, and bad input ends in one line, never a traceback.

Each test provokes one fault a careless user can cause (tiny 40 px images decoded at 32 px, CPU)."""
import errno
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train_classifier
import train_masker
from data import DataError, atomic_write, decode_all
from test_robustness import noise_image, run_argv, tiny_wbc

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def wbc(tmp_path_factory):
    return tiny_wbc(tmp_path_factory.mktemp("wbc"))


# ---------------------------------------------------------------------------- silent wrong results

@pytest.mark.parametrize("script", [train_classifier, train_masker])
def test_exploding_weights_are_never_saved_as_good(wbc, tmp_path, script):
    """--lr 1e30: the losses before the update are finite, the weights after it are not. The run must stop
    without writing a checkpoint, metrics or masks from them."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        script.main(run_argv(wbc, out, "--epochs", "1", "--lr", "1e30", "--save-every", "1"))
    assert "not finite" in str(e.value) and "no checkpoint had been saved yet" in str(e.value)
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    assert not (out / "masks").exists()


def test_training_on_nothing_stops(wbc, tmp_path):
    """Every mask empty and --alpha 1 0 (only the cell counts): every sample's weight is 0."""
    empty = tmp_path / "gen"
    for part in ("train", "val"):
        for f in (wbc / "WBC_100" / part / "data").glob("*/*.png"):
            (empty / part / f.parent.name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((40, 40), np.uint8)).save(empty / part / f.parent.name / f.name)
    root = tmp_path / "d"
    tiny_wbc(root)
    for f in (root / "WBC_100" / "train" / "mask").glob("*/*.png"):
        f.unlink()   # no ground truth: the empty generated masks are all there is
    with pytest.raises(DataError, match="every mask is empty; draw them again"):   # before training
        train_classifier.main(run_argv(root, tmp_path / "out", "--alpha", "1", "0", "--masks", str(empty)))
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_second_live_run_on_one_folder_is_refused(wbc, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as other:   # another live process holds the folder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="another run is writing into this folder"):
            train_classifier.main(run_argv(wbc, out, "--dry-run"))
    train_classifier.main(run_argv(wbc, out, "--dry-run"))   # its lock gone (a dead run's is too): fine


def test_masker_rerun_killed_while_writing_masks_leaves_no_old_result(wbc, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train_masker.main(run_argv(wbc, out, "--dry-run"))
    assert (out / "metrics.json").exists() and (out / "masks" / "val").is_dir()

    def die(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_masker, "save_mask_png", die)
    with pytest.raises(KeyboardInterrupt):
        train_masker.main(run_argv(wbc, out, "--dry-run", "--seed", "1"))
    assert not (out / "metrics.json").exists(), "the old run's metrics sit beside the new checkpoint"
    assert not (out / "masks").exists(), "old masks would pass for the new run's"


# ---------------------------------------------------------------------------- one line, not a traceback

def test_full_disk_while_saving_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")

    def no_space(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DataError, match=r"checkpoint.pt: could not write it \(No space left on device\)"):
        atomic_write(target, no_space)
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))


def test_truncated_decode_cache_is_rebuilt(tmp_path):
    noise_image(tmp_path / "A" / "a.png", 0)
    cache, logs = tmp_path / "cache", []
    first, _, _ = decode_all("image", [tmp_path / "A" / "a.png"], 32, cache)
    npy = next(cache.glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:100])   # a kill or a full disk cut it short
    again, _, _ = decode_all("image", [tmp_path / "A" / "a.png"], 32, cache, log=logs.append)
    assert np.array_equal(first, again) and any("decoding again" in line for line in logs)
    third, _, _ = decode_all("image", [tmp_path / "A" / "a.png"], 32, cache, log=logs.append)   # rewritten whole
    assert np.array_equal(first, third) and len(logs) == 1


def test_masker_with_one_mask_says_so(tmp_path):
    root = tiny_wbc(tmp_path / "d")
    masks = sorted((root / "WBC_100" / "train" / "mask").glob("*/*.png"))
    for f in masks[1:]:
        f.unlink()
    for f in (root / "WBC_100" / "val" / "mask").glob("*/*.png"):
        f.unlink()
    with pytest.raises(DataError, match="1 mask.*need 2"):
        train_masker.main(run_argv(root, tmp_path / "out"))


def test_resume_refuses_changed_training_files(wbc, tmp_path):
    root = tiny_wbc(tmp_path / "d")
    out = tmp_path / "out"
    argv = run_argv(root, out, "--epochs", "2", "--save-every", "1")
    train_classifier.main(argv)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    data.save_checkpoint(ckpt | {"finished": False, "epoch": 1}, out / "checkpoint.pt")   # as if killed after epoch 1
    img = next((root / "WBC_100" / "train" / "data" / "A").glob("*.png"))
    noise_image(img, 1, seed=99)   # same name and count, other pixels
    with pytest.raises(SystemExit, match="trained on other files"):
        train_classifier.main(argv + ["--resume"])


def test_stale_temp_files_of_a_killed_write_are_cleaned(wbc, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".checkpoint.pt.12345.tmp").write_bytes(b"\0" * 1000)
    train_classifier.main(run_argv(wbc, out, "--dry-run"))
    assert not list(out.glob(".*.tmp"))


def test_ctrl_c_says_resume_continues(wbc, tmp_path):
    proc = subprocess.Popen([sys.executable, str(HERE / "train_classifier.py"),
                             *run_argv(wbc, tmp_path / "out", "--epochs", "500")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "out" / ".lock").exists():
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "interrupted: --resume continues from the last checkpoint" in err


# ---------------------------------------------------------------------------- every flag, every bad value

BAD_VALUES = ("0", "-1", "nan", "inf")
NUMERIC = {train_classifier: ["--size", "--epochs", "--batch-size", "--lr", "--clip-grad", "--seed", "--save-every"],
           train_masker: ["--size", "--epochs", "--batch-size", "--lr", "--clip-grad", "--seed", "--save-every",
                          "--holdout", "--threshold", "--pretrain-epochs", "--stain", "--blur"],
           evaluate: ["--size", "--batch-size"]}
ZERO_OK = {"--clip-grad", "--seed", "--save-every", "--holdout", "--threshold", "--stain", "--blur"}


def flag_cases():
    for script, flags in NUMERIC.items():
        for flag in flags:
            for value in BAD_VALUES:
                if not (value == "0" and flag in ZERO_OK):
                    yield pytest.param(script, flag, value, id=f"{script.__name__} {flag} {value}")


def argv_of(script, wbc, out, *extra):
    if script is evaluate:
        return [str(out / "missing.pt"), *extra]
    return run_argv(wbc, out, *extra)


@pytest.mark.parametrize("script,flag,value", flag_cases())
def test_out_of_range_flags_are_argparse_errors(wbc, tmp_path, capsys, script, flag, value):
    with pytest.raises(SystemExit) as e:
        script.main(argv_of(script, wbc, tmp_path, flag, value))
    assert e.value.code == 2, f"{flag} {value} was accepted"
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("script", [train_classifier, train_masker])
@pytest.mark.parametrize("case", ["data is a file", "out is a file", "masks is a file", "device gpu", "weights folder"])
def test_files_where_folders_belong_and_back(wbc, tmp_path, script, case):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    extra = {"data is a file": ["--data", str(a_file)], "out is a file": ["--out", str(a_file)],
             "masks is a file": ["--alpha", "-1", "1", "--masks", str(a_file)] if script is train_classifier
             else ["--pretrain-on", str(a_file)],
             "device gpu": ["--device", "gpu"], "weights folder": ["--weights", str(tmp_path)]}[case]
    with pytest.raises((SystemExit, DataError)) as e:
        script.main(run_argv(wbc, tmp_path / "out", "--dry-run", *extra))
    message = str(e.value)
    assert e.type is DataError or e.value.code == 2 or message.count("\n") == 0, message
    assert "Traceback" not in message


@pytest.mark.parametrize("script", [train_classifier, train_masker])
def test_batch_of_one_is_refused_before_batchnorm_fails(wbc, tmp_path, capsys, script):
    with pytest.raises(SystemExit) as e:
        script.main(run_argv(wbc, tmp_path / "out", "--batch-size", "1"))
    assert e.value.code == 2 and "BatchNorm" in capsys.readouterr().err


def test_refused_pickle_names_the_code_not_torchs_advice(wbc, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": os.system, "args": {}}, evil)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(evil)])
    assert "refused" in str(e.value) and "system" in str(e.value) and "weights_only" not in str(e.value)


def test_evaluate_json_folder_and_size_zero_refused(tmp_path, capsys):
    for argv in (["x.pt", "--json", str(tmp_path)], ["x.pt", "--size", "0"], ["x.pt", "--batch-size", "0"]):
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(argv)
        assert e.value.code == 2
