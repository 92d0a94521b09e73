"""Fail loudly: no run exits 0 with wrong results, and bad input ends in one line, never a traceback.

Each test provokes one fault a careless user can cause (tiny 40 px images decoded at 32 px, CPU)."""
import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
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
import predict
import train_classifier
import train_masker
from data import DataError, atomic_write, decode_all
from resnet_cls import ResNetClassifier
from test_robustness import noise_image, run_argv, square_mask, tiny_wbc
from unet import UNet

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


# ---------------------------------------------------------- predict.py and evaluate.py (issue 19)

def save_fake_checkpoint(path, kind, classes=("A", "B"), **run):
    """A finished run's checkpoint with seeded random weights: predict and evaluate run it
    without training."""
    torch.manual_seed(0)
    channels = 4 if run.get("mask_mode") == "channel" else 3
    model = UNet() if kind == "masker" else ResNetClassifier(len(classes), channels)
    torch.save({"kind": kind, "finished": True, "classes": list(classes),
                "args": {"size": 32, **run}, "model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def fakes(wbc, tmp_path_factory):
    where = tmp_path_factory.mktemp("fakes")
    masker = save_fake_checkpoint(where / "m.pt", "masker", data=str(wbc), threshold=0.5)
    classifier = save_fake_checkpoint(where / "c.pt", "classifier", data=str(wbc))
    return {"masker": masker, "classifier": classifier}


def predict_argv(folder, out, fakes, *kinds, extra=()):
    flags = [x for kind in kinds for x in (f"--{kind}", fakes[kind])]
    return [str(folder), *flags, "--out", str(out), "--device", "cpu", *extra]


def csv_paths(out):
    with open(out / "predictions.csv", encoding="utf-8") as f:
        return [row["path"] for row in csv.DictReader(f)]


def test_predict_overlay_of_an_exif_rotated_jpeg_is_upright(tmp_path, fakes):
    """A phone JPEG stored 50x30 with EXIF 'turn 90 degrees': mask and overlay are both the
    upright 30x50."""
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "new").mkdir()
    stored = Image.fromarray(np.zeros((30, 50, 3), np.uint8))
    stored.save(tmp_path / "new" / "phone.jpg", exif=exif)
    predict.main(predict_argv(tmp_path / "new", tmp_path / "out", fakes, "masker"))
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "phone.png"))
    drawn = np.asarray(Image.open(tmp_path / "out" / "overlays" / "phone.png"))
    assert mask.shape == (50, 30) and drawn.shape == (50, 30, 3)


def test_predict_refuses_two_images_whose_masks_would_share_a_name(tmp_path, fakes):
    for ext in ("jpg", "png"):
        noise_image(tmp_path / "new" / f"x.{ext}", 0)
    with pytest.raises(DataError, match=r"x\.jpg and .*x\.png: two images with one name"):
        predict.main(predict_argv(tmp_path / "new", tmp_path / "out", fakes, "masker"))
    predict.main(predict_argv(tmp_path / "new", tmp_path / "out", fakes, "classifier"))   # no masks
    assert csv_paths(tmp_path / "out") == ["x.jpg", "x.png"]


@pytest.mark.parametrize("where", ["inside", "equal"])
def test_predict_never_reads_its_own_outputs_as_inputs(tmp_path, fakes, where):
    new = tmp_path / "new"
    for i in range(2):
        noise_image(new / f"img{i}.png", i)
    out = new / "pred" if where == "inside" else new
    predict.main(predict_argv(new, out, fakes, "masker"))
    predict.main(predict_argv(new, out, fakes, "classifier"))   # finds the last masks and overlays
    assert csv_paths(out) == ["img0.png", "img1.png"]


def test_predict_rerun_removes_the_previous_runs_outputs(tmp_path, fakes):
    new, out = tmp_path / "new", tmp_path / "out"
    noise_image(new / "A" / "a.png", 0)
    noise_image(new / "B" / "b.png", 1)
    predict.main(predict_argv(new, out, fakes, "masker", "classifier"))
    assert (out / "masks" / "B" / "b.png").exists() and (out / "scores.json").exists()
    (new / "B" / "b.png").unlink()
    noise_image(new / "c.png", 1)   # unlabelled: no scores this time
    predict.main(predict_argv(new, out, fakes, "classifier"))
    assert csv_paths(out) == ["A/a.png", "c.png"]
    assert not (out / "masks").exists() and not (out / "overlays").exists()
    assert not (out / "scores.json").exists()


def test_predict_never_clears_a_masks_folder_it_did_not_write(tmp_path, fakes):
    new = tmp_path / "new"
    noise_image(new / "img.png", 0)
    square_mask(new / "masks" / "img.png")   # the user's own masks; --out is the folder itself
    with pytest.raises(DataError, match="not written by predict.py"):
        predict.main(predict_argv(new, new, fakes, "masker"))
    assert (new / "masks" / "img.png").exists()


def test_adapt_bn_on_a_batch_of_one(tmp_path, fakes):
    """One image: refused in one line. Three in batches of two: the last image joins the batch
    before."""
    new = tmp_path / "new"
    noise_image(new / "img0.png", 0)
    adapt = ["--adapt-bn", "--batch-size", "2"]
    with pytest.raises(DataError, match="--adapt-bn needs at least 2 images"):
        predict.main(predict_argv(new, tmp_path / "out", fakes, "classifier", extra=adapt))
    for i in (1, 2):
        noise_image(new / f"img{i}.png", i % 2)
    argv = predict_argv(new, tmp_path / "out", fakes, "masker", "classifier", extra=adapt)
    predict.main(argv)
    assert len(csv_paths(tmp_path / "out")) == 3


def test_training_set_of_one_image_is_refused_in_one_line(tmp_path):
    root = tiny_wbc(tmp_path / "d", n_train=1)
    for part in ("train/data/B", "train/mask/B", "val/data/B"):
        shutil.rmtree(root / "WBC_100" / part)
    with pytest.raises(DataError, match="BatchNorm needs 2"):
        train_classifier.main(run_argv(root, tmp_path / "out", "--epochs", "1"))


def test_file_names_that_are_not_utf8_print_and_write(tmp_path, fakes, monkeypatch):
    """Linux names are bytes: b'\\xff.png' decodes to a surrogate escape, which a strict UTF-8
    stdout refuses."""
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    odd = tmp_path / os.fsdecode(b"new\xff")
    noise_image(odd / os.fsdecode(b"\xff.png"), 0)
    noise_image(odd / "plain.png", 1)
    predict.main(predict_argv(odd, tmp_path / "out", fakes, "masker", "classifier"))
    assert set(csv_paths(tmp_path / "out")) == {"\\xff.png", "plain.png"}
    with pytest.raises(SystemExit, match="not found"):   # prints the checkpoint's path first
        evaluate.main([str(odd / "x.pt")])
    with pytest.raises(DataError, match="not found"):    # prints its --out, then finds no data
        train_classifier.main(run_argv(odd / "missing", odd / "out", "--dry-run"))
    sys.stdout.flush()


def test_csv_cells_a_spreadsheet_would_run_are_quoted(tmp_path):
    texts = ("=1+1", "+1", "-1", "@SUM(A1)", "a=b")
    rows = [{"path": text, "p": "0.5000", "loss": -1.5} for text in texts]
    data.save_csv(rows, tmp_path / "x.csv")
    with open(tmp_path / "x.csv", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [r["path"] for r in back] == ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "a=b"]
    assert {r["p"] for r in back} == {"0.5000"}   # numbers stay numbers
    assert {r["loss"] for r in back} == {"-1.5"}


def test_channel_classifier_on_another_dataset_needs_its_masks(wbc, tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(wbc / "WBC_100" / "val" / "mask", masks / "val")   # the run's val masks
    ckpt = save_fake_checkpoint(tmp_path / "c.pt", "classifier", data=str(wbc), masks=str(masks),
                                mask_mode="channel")
    other = tmp_path / "other"
    shutil.copytree(wbc, other)   # same stems, so the run's masks would fit silently
    with pytest.raises(SystemExit, match="--mask-dir") as e:
        evaluate.main([ckpt, "--data", str(other), "--device", "cpu"])
    assert "\n" not in str(e.value)
    evaluate.main([ckpt, "--device", "cpu"])   # its own dataset: its own masks
    theirs = other / "WBC_100" / "val" / "mask"
    evaluate.main([ckpt, "--data", str(other), "--mask-dir", str(theirs), "--device", "cpu"])


def test_confusion_matrix_names_every_class_whole(tmp_path, capsys):
    classes = ("Neutrophil", "Neutrophil_band")   # the same first 5 letters
    for c, cls in enumerate(classes):
        noise_image(tmp_path / "val" / cls / "img.png", c)
    ckpt = save_fake_checkpoint(tmp_path / "c.pt", "classifier", classes, data=str(tmp_path))
    evaluate.main([ckpt, "--data", str(tmp_path / "val"), "--device", "cpu"])
    table = capsys.readouterr().out.split("confusion (rows true")[1].splitlines()[1:]
    header, rows = table[0].split(), [line.split() for line in table[1:]]
    assert len(header) == len(classes) == len(rows)
    named = {row[0]: row[1] for row in rows}   # a numbered legend: row j names column j
    assert [named.get(h, h) for h in header] == list(classes)


def test_threshold_is_probability_at_least_t_everywhere(wbc, tmp_path, fakes, monkeypatch,
                                                        capsys):
    """Logits 0 are probability 0.5, exactly the default threshold: every pixel is cell, in every
    script."""
    def half(model, images, *args, **kw):
        return torch.zeros(len(images), 1, *images.shape[-2:])
    for script in (evaluate, predict, train_masker):
        monkeypatch.setattr(script, "infer", half)
    m = evaluate.main([fakes["masker"], "--device", "cpu"])
    assert m["dice"] > 0 and m["mean_image_dice"] > 0
    assert "pooled over pixels" in capsys.readouterr().out
    val = wbc / "WBC_100" / "val" / "data"
    scores = predict.main(predict_argv(val, tmp_path / "p", fakes, "masker"))["masker"]
    assert scores["dice"] == m["dice"] and scores["mean_image_dice"] == m["mean_image_dice"]
    drawn = [tmp_path / "p" / "masks" / "A" / "val_A_0.png"]   # 40 px: interpolation rounds a few
    train_masker.main(run_argv(wbc, tmp_path / "m", "--dry-run"))
    drawn.append(tmp_path / "m" / "masks" / "val" / "A" / "val_A_0.png")
    assert all(np.asarray(Image.open(path)).mean() > 0.9 * 255 for path in drawn)


def test_ctrl_c_in_predict_and_evaluate_is_one_line(wbc, tmp_path, fakes):
    """Ctrl-C while decoding (data.decode_all raises KeyboardInterrupt): one line each, no
    traceback."""
    folder = wbc / "WBC_100" / "val" / "data"
    runs = [("predict.py", predict_argv(folder, tmp_path / "out", fakes, "masker")),
            ("evaluate.py", [fakes["masker"], "--device", "cpu"])]
    code = ("import runpy, sys, data\n"
            "def stop(*args, **kw):\n"
            "    raise KeyboardInterrupt\n"
            "data.decode_all = stop\n"
            f"for script, argv in {runs!r}:\n"
            "    sys.argv = [script, *argv]\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        print('exit:', e.code)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.count("exit: interrupted") == 2, done.stdout


def test_predict_on_a_file_and_with_an_unfinished_masker(wbc, tmp_path, fakes, capsys):
    a_file = tmp_path / "f.png"
    noise_image(a_file, 0)
    with pytest.raises(DataError, match="a file; give the folder"):
        predict.main(predict_argv(a_file, tmp_path / "out", fakes, "masker"))
    ckpt = torch.load(fakes["masker"], weights_only=True) | {"finished": False, "epoch": 3}
    torch.save(ckpt, tmp_path / "m.pt")
    unfinished = {"masker": str(tmp_path / "m.pt")}
    val = wbc / "WBC_100" / "val" / "data"
    predict.main(predict_argv(val, tmp_path / "out", unfinished, "masker"))
    assert "unfinished run (stopped after epoch 3)" in capsys.readouterr().out


def test_predict_batch_of_one_needs_no_adabn():
    argv = ["folder", "--classifier", "c.pt", "--out", "out", "--batch-size", "1"]
    assert predict.parse_args(argv).batch_size == 1   # eval-mode BatchNorm takes one image
    for extra in (["--adapt-bn"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as e:
            predict.parse_args(argv + extra)
        assert e.value.code == 2
