"""Issue 5: bad input, interrupted runs and untrusted files give clear errors and lose nothing.

Every test uses a few 40 px images written here (decoded at 32 px) and 1-3 epochs on the CPU.
"""
import csv
import json
import os
import re
import runpy
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import evaluate
import train_classifier
import train_masker
import data
from data import DataError, decode_all, decode_image, decode_mask, load_set

HERE = Path(__file__).parent
CLASSES = ("A", "B")


# ---------------------------------------------------------------------------- tiny datasets

def noise_image(path, channel, size=(40, 40), seed=0, fmt=None):
    """Random RGB picture whose `channel` is bright (so the two classes are learnable)."""
    a = np.random.default_rng(seed).integers(0, 200, (size[1], size[0], 3), dtype=np.uint8)
    a[..., channel] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format=fmt)


def square_mask(path, size=(40, 40)):
    m = np.zeros((size[1], size[0]), np.uint8)
    m[size[1] // 4:3 * size[1] // 4, size[0] // 5:3 * size[0] // 5] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


def tiny_wbc(root, n_train=3, n_val=1):
    """ROOT/WBC_100/{train,val}/{data,mask}/<A|B>/<stem>.png, every image with a mask, and an
    empty generated-masks folder ROOT/gen/{train,val} (ground truth is found first)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(CLASSES):
            for i in range(n):
                stem = f"{split}_{cls}_{i}"
                noise_image(root / "WBC_100" / split / "data" / cls / f"{stem}.png", c, seed=zlib.crc32(stem.encode()))
                square_mask(root / "WBC_100" / split / "mask" / cls / f"{stem}.png")
    for split in ("train", "val"):
        (root / "gen" / split).mkdir(parents=True)
    return root


def run_argv(root, out, *extra):
    """Flags of a tiny CPU run of either training script (a later flag overrides an earlier one)."""
    return ["--data", str(root), "--split", "100", "--size", "32", "--batch-size", "3", "--device", "cpu",
            "--amp", "off", "--cache", "none", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def wbc(tmp_path_factory):
    return tiny_wbc(tmp_path_factory.mktemp("wbc"))


# ---------------------------------------------------------------------------- 1. images

def add_bad_images(folder):
    """Four unreadable files in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    noise_image(folder / "whole.jpg", 0)
    noise_image(folder / "whole.png", 0)
    jpg, png = (folder / "whole.jpg").read_bytes(), (folder / "whole.png").read_bytes()
    bad = {"truncated_jpg.jpg": jpg[:len(jpg) // 2],
           "truncated.png": png[:len(png) // 2],
           "empty.png": b"",
           "text.png": b"this is not a picture\n"}
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    (folder / "whole.jpg").unlink()
    (folder / "whole.png").unlink()
    return [folder / name for name in bad]


def add_debris(train_data):
    """Files and folders that are never images or classes, and a TIFF named .png (it decodes)."""
    (train_data / "A" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    for folder in (".hidden", "__MACOSX", ".ipynb_checkpoints", "A/.ipynb_checkpoints"):
        (train_data / folder).mkdir(parents=True, exist_ok=True)
        (train_data / folder / "x.png").write_bytes(b"not an image")
    noise_image(train_data / "A" / "tiff_named.png", 0, fmt="TIFF")


def test_bad_images_listed_at_startup_also_from_cache_and_skip_bad(tmp_path, capsys):
    root = tiny_wbc(tmp_path / "d")
    train_data = root / "WBC_100" / "train" / "data"
    bad = add_bad_images(train_data / "A")
    add_debris(train_data)
    cache = tmp_path / "cache"
    argv = run_argv(root, tmp_path / "out", "--dry-run", "--cache", str(cache))
    for attempt in ("decoded", "from the cache"):   # the cache keeps the bad list: no second-run pass
        with pytest.raises(DataError) as e:
            train_classifier.main(argv)
        message = str(e.value)
        assert "4 unreadable image file(s)" in message and "--skip-bad" in message, attempt
        for path in bad:
            assert str(path) in message, (attempt, path)
        assert "truncated" in message and "cannot identify image file" in message
        assert "tiff_named" not in message and "x.png" not in message
        assert list(cache.glob("image-*.json")), "the first run wrote the cache"
    train_classifier.main(argv + ["--skip-bad"])
    out = capsys.readouterr().out
    assert "skipped 4 unreadable image file(s)" in out and all(str(p) in out for p in bad)
    assert "train 7 images {'A': 4, 'B': 3}" in out   # 3 + the TIFF in A; debris never a class
    with pytest.raises(DataError, match="4 unreadable"):   # --skip-bad did not bless them in the cache
        train_classifier.main(argv)


def test_no_readable_image_left_is_an_error(tmp_path):
    bad = add_bad_images(tmp_path / "A")
    with pytest.raises(DataError, match="none of its 4 image"):
        load_set(tmp_path, 32, skip_bad=True, log=lambda _: None)
    assert len(bad) == 4


def mode_image(mode):
    """(PIL image, expected RGB of its (0, 0) pixel) for each input mode to support."""
    if mode == "L":
        return Image.new("L", (8, 8), 100), (100, 100, 100)
    if mode == "LA":
        return Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)      # transparent: white background
    if mode == "RGBA":
        return Image.new("RGBA", (8, 8), (10, 20, 30, 255)), (10, 20, 30)
    if mode == "P":
        im = Image.new("P", (8, 8), 1)
        im.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
        return im, (200, 30, 60)
    if mode == "1":
        return Image.new("1", (8, 8), 1), (255, 255, 255)
    if mode == "CMYK":
        im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
        return im, im.convert("RGB").getpixel((0, 0))               # Pillow's own CMYK conversion: red
    raise ValueError(mode)


@pytest.mark.parametrize("mode,ext", [("L", "png"), ("LA", "png"), ("RGBA", "png"), ("P", "png"), ("1", "png"),
                                      ("CMYK", "jpg"), ("CMYK", "tif")])
def test_image_modes_decode_to_rgb(tmp_path, mode, ext):
    im, expected = mode_image(mode)
    path = tmp_path / f"x.{ext}"
    im.save(path)
    array, shape = decode_image(path, 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8 and shape == (8, 8)
    tolerance = 12 if ext == "jpg" else 1
    assert np.abs(array[0, 0].astype(int) - expected).max() <= tolerance, (array[0, 0], expected)


def test_16bit_image_is_scaled_not_saturated(tmp_path):
    """A 12-bit camera picture in a 16-bit PNG (values up to 4000): scaled by 4095, in order."""
    a = np.zeros((8, 8), np.uint16)
    a[:, :4], a[:, 4:] = 2000, 4000
    Image.fromarray(a).save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode.startswith("I")
    array, _ = decode_image(tmp_path / "x.png", 8)
    dark, bright = int(array[0, 0, 0]), int(array[0, 7, 0])
    assert bright == round(4000 / 4095 * 255) and dark == round(2000 / 4095 * 255)
    assert (array < 255).all(), "saturated"


def test_exif_rotated_jpeg_and_mask_line_up(tmp_path):
    """A camera JPEG stored sideways with EXIF orientation 6 ("turn 90 degrees clockwise to view"),
    and its mask drawn on the picture as viewers show it: both decode upright and aligned."""
    shown = np.full((24, 40, 3), 40, np.uint8)                   # 40 wide, 24 high as displayed
    shown[2:12, 3:15] = (250, 40, 40)                            # a red cell, top left as displayed
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)   # the sensor's sideways pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "data" / "A" / "cam.jpg"
    path.parent.mkdir(parents=True)
    stored.save(path, exif=exif, quality=95)
    mask = np.zeros((24, 40), np.uint8)
    mask[2:12, 3:15] = 255
    (tmp_path / "mask" / "A").mkdir(parents=True)
    Image.fromarray(mask).save(tmp_path / "mask" / "A" / "cam.png")
    logs = []
    s = load_set(tmp_path / "data", 32, mask_dirs=[tmp_path / "mask"], log=logs.append)
    assert s.sizes == [(40, 24)]                                # the displayed size, as masks are drawn
    assert not any("differ in size" in line for line in logs)
    red = s.images[0, 0] > 150
    assert s.masks[0, 0].bool().sum() > 50
    assert (red == s.masks[0, 0].bool()).float().mean() > 0.97


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [300, 100])   # 400 px: over 2x the limit Pillow raises, under 2x it only warns
def test_decompression_bomb_refused(tmp_path, monkeypatch, limit):
    noise_image(tmp_path / "A" / "big.png", 0, size=(20, 20))
    square_mask(tmp_path / "big_mask.png", size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=r"big\.png: DecompressionBombError"):
        load_set(tmp_path, 32, log=lambda _: None)
    _, _, bad = decode_all("mask", [tmp_path / "big_mask.png"], 32)
    assert "DecompressionBombError" in bad[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------- 2. masks

def test_mask_problems_are_logged_and_handled(tmp_path, capsys):
    """A mask twice its image's size (resized nearest, logged), a mask with no image (reported),
    stray values (below 64 background, from 64 cell), through train_classifier.main."""
    root = tiny_wbc(tmp_path / "d")
    mask_dir = root / "WBC_100" / "train" / "mask" / "A"
    square_mask(mask_dir / "train_A_0.png", size=(80, 80))
    square_mask(mask_dir / "ghost.png")
    stray = np.zeros((40, 40), np.uint8)
    stray[10:30, 8:24] = 255
    stray[0, :20], stray[39, :20], stray[20, 30:] = 1, 7, 100
    Image.fromarray(stray).save(mask_dir / "train_A_1.png")
    train_classifier.main(run_argv(root, tmp_path / "out", "--dry-run", "--alpha", "-1", "1",
                                   "--masks", str(root / "gen")))
    out = capsys.readouterr().out
    assert "1 mask(s) differ in size from their image: resized with nearest-neighbour" in out
    assert "1 mask(s) match no image, ignored" in out and str(mask_dir / "ghost.png") in out
    decoded, _ = decode_mask(mask_dir / "train_A_1.png", 40)
    assert decoded.dtype == np.uint8 and set(np.unique(decoded)) == {0, 1}
    assert np.array_equal(decoded.astype(bool), stray >= 64)


@pytest.mark.parametrize("flags", [["--alpha", "1", "0"], ["--mask-mode", "channel"]])
def test_missing_mask_folder_is_named(wbc, tmp_path, flags):
    root = shutil.copytree(wbc, tmp_path / "d")
    shutil.rmtree(root / "WBC_100" / "train" / "mask" / "B")   # B's images need generated masks
    with pytest.raises(DataError) as e:
        train_classifier.main(run_argv(root, tmp_path / "out", "--masks", str(tmp_path / "nowhere"), *flags))
    assert str(tmp_path / "nowhere" / "train") in str(e.value) and "draw them with train_masker.py" in str(e.value)


def test_channel_mode_names_missing_val_masks(wbc, tmp_path):
    (tmp_path / "gen" / "train").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        train_classifier.main(run_argv(wbc, tmp_path / "out", "--masks", str(tmp_path / "gen"),
                                       "--mask-mode", "channel"))
    assert f"2 of 2 images of {wbc / 'WBC_100' / 'val' / 'data'} have no mask in" in str(e.value)
    assert str(tmp_path / "gen" / "val") in str(e.value)


# ---------------------------------------------------------------------------- 3. layout

def layout(tmp_path, case):
    """A dataset root broken in one way; returns (root, split, what the message must say)."""
    root = tmp_path / "d"
    if case == "missing root":
        return root, "100", f"{root}: data folder not found"
    if case == "empty root":
        root.mkdir()
        return root, "100", f"{root / 'WBC_100' / 'train' / 'data'}: folder not found (expected ROOT/WBC_<split>"
    tiny_wbc(root)
    if case == "missing split":
        return root, "10", f"{root / 'WBC_10' / 'train' / 'data'}: folder not found"
    if case == "empty class folder":
        (root / "WBC_100" / "train" / "data" / "C").mkdir()
        return root, "100", f"{root / 'WBC_100' / 'train' / 'data' / 'C'}: class folder has no images"
    if case == "unknown val class":
        noise_image(root / "WBC_100" / "val" / "data" / "Z" / "z.png", 0)
        return root, "100", f"{root / 'WBC_100' / 'val' / 'data'}: class folder(s) ['Z'] unknown to training"
    if case == "val without classes":
        shutil.rmtree(root / "WBC_100" / "val" / "data")
        (root / "WBC_100" / "val" / "data").mkdir()
        return root, "100", f"{root / 'WBC_100' / 'val' / 'data'}: no class sub-folders"
    raise ValueError(case)


@pytest.mark.parametrize("script", [train_classifier, train_masker])
@pytest.mark.parametrize("case", ["missing root", "empty root", "missing split", "empty class folder",
                                  "unknown val class", "val without classes"])
def test_layout_errors_name_the_path(tmp_path, script, case):
    root, split, expected = layout(tmp_path, case)
    argv = run_argv(root, tmp_path / "out")
    argv[argv.index("--split") + 1] = split
    with pytest.raises(DataError) as e:   # main() raises; only `python script.py` turns it into "error: ..."
        script.main(argv)
    assert expected in str(e.value)


def test_evaluate_names_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nowhere'}: folder not found")):
        evaluate.main(["--pred-masks", str(tmp_path / "p"), "--true-masks", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("script", ["train_classifier.py", "train_masker.py"])
def test_script_run_as_main_exits_with_error_line(tmp_path, monkeypatch, script):
    """`python script.py` turns the DataError into SystemExit("error: ..."): one line, no traceback
    (runpy instead of a subprocess: the modules are already imported, so this takes no time)."""
    monkeypatch.setattr(sys, "argv", [script, "--data", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(HERE / script), run_name="__main__")
    assert str(e.value) == (f"error: {tmp_path / 'nowhere'}: data folder not found "
                            f"(make one with: python synth.py {tmp_path / 'nowhere'})")


# ---------------------------------------------------------------------------- 4. interruptions

class Killed(Exception):
    """Stands for a kill right after a checkpoint was written."""


def run_killed(script, argv, at):
    """script.main(argv), killed right after the checkpoint whose (stage, epoch) is `at` was saved."""
    real = script.save_checkpoint

    def save_then_die(state, path):
        real(state, path)
        if (state.get("stage"), state["epoch"]) == at and not state["finished"]:
            raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(script, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            script.main(argv)
    while data.HELD:   # a killed process's locks go with it
        data.HELD.pop().close()


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def log_rows(path):
    """log.csv without the timing column, which differs between runs."""
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "img_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def classifier_runs(wbc, tmp_path_factory):
    """argv(out, *more) of a 3-epoch mask-guided run; its output uninterrupted, and killed right
    after epoch 2's checkpoint."""
    base = tmp_path_factory.mktemp("cls")
    full, killed = base / "full", base / "killed"

    def argv(out, *more):   # one batch of 6 per epoch: the shuffle still decides which image gets which crop
        return run_argv(wbc, out, "--epochs", "3", "--batch-size", "6", "--alpha", "-1", "1",
                        "--masks", str(wbc / "gen"), *more)

    train_classifier.main(argv(full))
    run_killed(train_classifier, argv(killed), at=(None, 2))
    return argv, full, killed


def test_classifier_resume_is_bit_identical(classifier_runs, tmp_path):
    argv, full, killed = classifier_runs
    out = tmp_path / "resumed"
    shutil.copytree(killed, out, copy_function=os.link, ignore=shutil.ignore_patterns(".lock"))   # safe: every write replaces, never edits
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)   # everything loads with weights_only
    assert stopped["epoch"] == 2 and not stopped["finished"] and len(stopped["log_rows"]) == 2
    train_classifier.main(argv(out, "--resume"))
    a, b = weights(full / "checkpoint.pt"), weights(out / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_rows(full / "log.csv") == log_rows(out / "log.csv")
    assert evaluate.main([str(out / "checkpoint.pt")])["accuracy"] == \
        json.loads((out / "metrics.json").read_text())["accuracy"]


def test_classifier_resume_without_rng_states_differs(classifier_runs, tmp_path, monkeypatch):
    """The control: the same resume with the RNG states not put back draws other batches."""
    argv, full, killed = classifier_runs
    out = tmp_path / "resumed"
    shutil.copytree(killed, out, copy_function=os.link, ignore=shutil.ignore_patterns(".lock"))   # safe: every write replaces, never edits
    monkeypatch.setattr(train_classifier.torch, "set_rng_state", lambda state: None)
    train_classifier.main(argv(out, "--resume"))
    a, b = weights(full / "checkpoint.pt"), weights(out / "checkpoint.pt")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_or_no_checkpoint(classifier_runs, tmp_path):
    argv, _, killed = classifier_runs
    with pytest.raises(SystemExit, match=r"--resume: .*checkpoint.pt was written with other --lr "
                                         r"\(0.003 then, 0.1 now\)"):
        train_classifier.main(argv(killed, "--resume", "--lr", "0.1"))
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'checkpoint.pt'}: checkpoint not found")):
        train_classifier.main(argv(tmp_path, "--resume"))


def test_masker_resume_is_bit_identical(tmp_path, untrained_masks):
    """CAM16 pretraining then WBC fine-tuning, killed in the WBC stage: the resume skips CAM16."""
    root = tiny_wbc(tmp_path / "d", n_train=2)
    for i, cls in enumerate(("normal", "tumor")):
        noise_image(root / "CAM16" / "train" / "data" / cls / f"c{i}.png", i % 3)
        square_mask(root / "CAM16" / "train" / "mask" / cls / f"c{i}.png")
    flags = ("--epochs", "2", "--pretrain-on", str(root / "CAM16"), "--pretrain-epochs", "1", "--batch-size", "4")
    train_masker.main(run_argv(root, tmp_path / "full", *flags))
    resumed = run_argv(root, tmp_path / "resumed", *flags)
    run_killed(train_masker, resumed, at=("wbc", 1))
    train_masker.main(resumed + ["--resume"])
    a, b = weights(tmp_path / "full" / "checkpoint.pt"), weights(tmp_path / "resumed" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_rows(tmp_path / "full" / "log.csv") == log_rows(tmp_path / "resumed" / "log.csv")
    assert len(list((tmp_path / "resumed" / "masks" / "val").glob("*/*.png"))) == 2


# ---------------------------------------------------------------------------- 5. untrusted files

class Evil:
    """Unpickling this runs a shell command: a checkpoint with it must be refused, unrun."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_checkpoints(folder):
    """{name: (path, what the error must say)}: files that are not usable checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "pwned"
    torch.save({"model": Evil(marker), "args": {}}, folder / "evil.pt")
    torch.save({"model": {"w": torch.zeros(1000)}, "args": {}}, folder / "whole.pt")
    (folder / "truncated.pt").write_bytes((folder / "whole.pt").read_bytes()[:500])
    (folder / "empty.pt").write_bytes(b"")
    torch.save({"model": [1, 2], "args": {}}, folder / "no_state_dict.pt")
    refused = "not a loadable checkpoint (UnpicklingError: Weights only load failed"
    return marker, {"evil": (folder / "evil.pt", refused),
                    "truncated": (folder / "truncated.pt", "not a loadable checkpoint"),
                    "empty": (folder / "empty.pt", "checkpoint is empty (0 bytes)"),
                    "not a state dict": (folder / "no_state_dict.pt", "its 'model' entry is not a state dict")}


@pytest.mark.parametrize("case", ["evil", "truncated", "empty", "not a state dict"])
def test_untrusted_checkpoints_refused_before_training(wbc, tmp_path, capsys, case):
    marker, cases = bad_checkpoints(tmp_path / "ckpts")
    path, expected = cases[case]
    with pytest.raises(SystemExit) as e:
        train_classifier.main(run_argv(wbc, tmp_path / "out", "--init", str(path)))
    assert str(e.value).startswith(f"{path}: {expected}")
    assert "images {" not in capsys.readouterr().out          # stopped before the data, let alone training
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), "--data", str(wbc)])
    assert str(e.value).startswith(f"{path}: {expected}")
    assert not marker.exists(), "the pickle's code ran"


def test_evil_weights_file_refused(wbc, tmp_path):
    marker, cases = bad_checkpoints(tmp_path / "ckpts")
    with pytest.raises(SystemExit, match=re.escape(f"--weights {cases['evil'][0]}: not a readable state dict")):
        train_classifier.main(run_argv(wbc, tmp_path / "out", "--weights", str(cases["evil"][0])))
    assert not marker.exists()


def test_wrong_architecture_named(wbc, tmp_path):
    unet_like = tmp_path / "unet.pt"
    torch.save({"kind": "masker", "model": {"encoder.conv1.weight": torch.zeros(64, 3, 7, 7)},
                "args": {"size": 32, "data": str(wbc)}}, unet_like)
    with pytest.raises(SystemExit, match=re.escape(f"{unet_like}: not a resnet34 backbone (missing ['bn1.bias'")):
        train_classifier.main(run_argv(wbc, tmp_path / "out", "--init", str(unet_like)))
    with pytest.raises(SystemExit, match=re.escape(f"{unet_like}: weights don't fit the UNet (Missing key(s)")):
        evaluate.main([str(unet_like)])
    three_class = tmp_path / "cls.pt"
    torch.save({"kind": "classifier", "model": {"backbone.fc.weight": torch.zeros(3, 512)},
                "args": {"size": 32, "data": str(wbc)}, "classes": ["A", "B"]}, three_class)
    with pytest.raises(SystemExit, match=re.escape(f"{three_class}: weights don't fit a 2-class, 3-channel ResNet34")):
        evaluate.main([str(three_class)])


def test_every_torch_load_is_weights_only():
    calls = []
    for path in HERE.glob("*.py"):
        for match in re.finditer(r"torch\.load\(((?:[^()]|\([^()]*\))*)\)", path.read_text()):
            calls.append((path.name, match.group(1)))
    assert any(name == "data.py" for name, _ in calls) and any(name == "resnet_cls.py" for name, _ in calls)
    assert all("weights_only=True" in args for _, args in calls), [c for c in calls if "weights_only=True" not in c[1]]


# ---------------------------------------------------------------------------- 6. numbers

def test_nan_loss_stops_naming_epoch_and_step_keeping_last_good(wbc, tmp_path, monkeypatch, capsys):
    real, calls = train_classifier.weighted_ce, []

    def nan_on_call_4(*args, **kw):   # 2 steps per epoch: call 4 is epoch 2, step 2
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(train_classifier, "weighted_ce", nan_on_call_4)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_classifier.main(run_argv(wbc, out, "--epochs", "3"))
    assert str(e.value).startswith(f"error: epoch 2/3 step 2: the loss is nan (not finite); stopped, "
                                   f"the last good checkpoint is {out / 'checkpoint.pt'} (epoch 1)")
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1 and not kept["finished"]
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert len(log_rows(out / "log.csv")) == 1
    evaluate.main([str(out / "checkpoint.pt")])   # still usable, and says what it is
    assert f"note: {out / 'checkpoint.pt'} is from an unfinished run (stopped after epoch 1)" in capsys.readouterr().out


def test_masker_inf_loss_stops(wbc, tmp_path, monkeypatch):
    real = train_masker.MASKER_LOSSES["center"]
    monkeypatch.setitem(train_masker.MASKER_LOSSES, "center", lambda logits, m: real(logits, m) + float("inf"))
    with pytest.raises(SystemExit, match=r"error: wbc epoch 1/2 step 1: the loss is inf \(not finite\); "
                                         r"stopped, no checkpoint had been saved yet"):
        train_masker.main(run_argv(wbc, tmp_path / "out", "--epochs", "2"))
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_clip_grad_clips_every_step(wbc, tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: seen.append(max_norm)
                        or real(params, max_norm))
    train_classifier.main(run_argv(wbc, tmp_path / "out", "--dry-run", "--clip-grad", "0.5"))
    assert seen == [0.5]   # one step, clipped (without the flag: never called, as in every other test)


# ---------------------------------------------------------------------------- 7. command line

@pytest.mark.parametrize("script,argv,message", [
    (train_classifier, ["--split", "7"], "argument --split: invalid choice: 7"),
    (train_classifier, ["--lr", "-1"], "need finite --lr > 0"),
    (train_classifier, ["--lr", "nan"], "need finite --lr > 0"),
    (train_classifier, ["--epochs", "0"], "--epochs >= 1"),
    (train_classifier, ["--size", "16"], "--size >= 32"),
    (train_classifier, ["--batch-size", "1"], "--batch-size 2+ (BatchNorm) x 1 process(es)"),
    (train_masker, ["--batch-size", "1"], "--batch-size 2+ (BatchNorm) x 1 process(es)"),
    (train_classifier, ["--alpha", "-2", "1"], "--alpha: alpha (-2, 1) gives negative weights"),
    (train_classifier, ["--alpha", "0", "0"], "weighs every location 0"),
    (train_classifier, ["--alpha", "nan", "1"], "--alpha: alpha (nan, 1): must be finite numbers"),
    (train_classifier, ["--pretrained", "--weights", "w.pt"], "not allowed with argument"),
    (train_classifier, ["--init", "a.pt", "--weights", "w.pt"], "not allowed with argument"),
    (train_classifier, ["--clip-grad", "-1"], "--clip-grad >= 0"),
    (train_classifier, ["--mask-mode", "pixels"], "argument --mask-mode: invalid choice: 'pixels'"),
    (train_masker, ["--split", "7"], "argument --split: invalid choice: 7"),
    (train_masker, ["--size", "70"], "need --size a multiple of 32 (the UNet)"),
    (train_masker, ["--holdout", "1"], "--holdout in [0, 1)"),
    (train_masker, ["--pretrained", "--weights", "w.pt"], "not allowed with argument"),
    (train_masker, ["--threshold", "2"], "--threshold in [0, 1]"),
    (train_masker, ["--save-every", "-1"], "--seed, --save-every >= 0"),
    (evaluate, ["--pred-masks", "p"], "--pred-masks and --true-masks go together"),
    (evaluate, [], "give a checkpoint, or --pred-masks and --true-masks"),
])
def test_bad_flags_refused_by_argparse(capsys, script, argv, message):
    with pytest.raises(SystemExit) as e:
        script.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------- 8. issue 19: training and resume

@pytest.fixture
def untrained_masks(monkeypatch):
    """A few epochs on 6 images learn nothing: allowed where resuming is the subject."""
    monkeypatch.setattr(train_masker, "check_learned", lambda *args: None)


def test_masker_resume_without_pretraining_goes_on(wbc, tmp_path, untrained_masks):
    """The design card's own run (no --pretrain-on), killed after epoch 1 of 3 and resumed: the
    same weights and log as an unbroken run, not an untrained UNet's masks."""
    flags = ("--epochs", "3", "--batch-size", "6")
    train_masker.main(run_argv(wbc, tmp_path / "full", *flags))
    resumed = run_argv(wbc, tmp_path / "resumed", *flags)
    run_killed(train_masker, resumed, at=("wbc", 1))
    train_masker.main(resumed + ["--resume"])
    a, b = weights(tmp_path / "full" / "checkpoint.pt"), weights(tmp_path / "resumed" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(log_rows(tmp_path / "resumed" / "log.csv")) == 3
    assert log_rows(tmp_path / "full" / "log.csv") == log_rows(tmp_path / "resumed" / "log.csv")


@pytest.mark.parametrize("script", [train_classifier, train_masker])
@pytest.mark.parametrize("before,after", [("off", "fp16"), ("fp16", "off")])
def test_amp_may_change_on_resume(wbc, tmp_path, untrained_masks, script, before, after):
    """A checkpoint without a grad scaler's state resumes under --amp fp16, and the reverse."""
    argv = run_argv(wbc, tmp_path / "out", "--epochs", "2", "--batch-size", "6", "--amp", before)
    run_killed(script, argv, at=("wbc" if script is train_masker else None, 1))
    script.main(argv + ["--amp", after, "--resume"])
    finished = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert finished["finished"] and finished["epoch"] == 2


def amp_scripts():
    import bench
    import predict
    import sweep_report
    return [train_masker, train_classifier, evaluate, predict, bench, sweep_report]


@pytest.mark.parametrize("script", amp_scripts(), ids=lambda m: m.__name__)
def test_amp_auto_picks_bf16_only_where_native(monkeypatch, script):
    """A T4 (7.5) says is_bf16_supported() (emulated): fp16 there; an A100 (8.0) gets bf16. The
    capability asked is the named device's, not the current one's."""
    capability = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda d=None: capability[torch.device(d).index or 0])
    assert script.pick_amp(torch.device("cuda:0")) == "fp16"
    assert script.pick_amp(torch.device("cuda:1")) == "bf16"
    for native, expected in ((True, "bf16"), (False, "off")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        assert script.pick_amp(torch.device("cpu")) == expected


def test_evaluate_follows_the_device_not_the_checkpoint(classifier_runs, tmp_path, monkeypatch):
    """A run trained under fp16, scored on a CPU without bf16: no autocast (CPU fp16 is slow)."""
    _, full, _ = classifier_runs
    ckpt = torch.load(full / "checkpoint.pt", weights_only=True)
    ckpt["args"]["amp"] = "fp16"
    torch.save(ckpt, tmp_path / "fp16.pt")
    seen = []
    real = evaluate.infer
    monkeypatch.setattr(evaluate, "infer", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    evaluate.main([str(tmp_path / "fp16.pt"), "--device", "cpu"])
    assert [autocast._enabled for autocast in seen] == [False]


class Planned(Exception):
    """Stands for the end of a test run once the planned epochs are printed."""


def stop_at_training(*args, **kw):
    raise Planned


def add_non_images(folder):
    """Files the loader never reads: hidden, not an image, a hidden folder."""
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "notes.txt").write_text("counted by glob('*/*'), not by the loader")
    (folder / "._train_A_0.png").write_bytes(b"macOS resource fork")


@pytest.mark.parametrize("script", [train_classifier, train_masker])
def test_epochs_count_the_images_the_loader_reads(wbc, tmp_path, monkeypatch, capsys, script):
    root = shutil.copytree(wbc, tmp_path / "d")
    for kind in ("data", "mask"):
        add_non_images(root / "WBC_100" / "train" / kind / "A")
    monkeypatch.setattr(script, "train_one_epoch", stop_at_training)
    with pytest.raises(Planned):
        script.main(run_argv(root, tmp_path / "out", "--epochs", "2"))
    out = capsys.readouterr().out
    assert ("| 2 epochs" if script is train_classifier else "for 2 epochs") in out, out


def test_holdout_keeps_the_split_100_epochs(wbc, tmp_path, monkeypatch, capsys):
    """WBC_100 without val masks, half the masks held out: WBC_100 still runs --epochs epochs."""
    root = shutil.copytree(wbc, tmp_path / "d")
    shutil.rmtree(root / "WBC_100" / "val" / "mask")
    monkeypatch.setattr(train_masker, "train_one_epoch", stop_at_training)
    with pytest.raises(Planned):
        train_masker.main(run_argv(root, tmp_path / "out", "--epochs", "2", "--holdout", "0.5"))
    assert "wbc on 3 masks for 2 epochs; 3 held out" in capsys.readouterr().out


def test_masker_that_learned_nothing_writes_no_masks(wbc, tmp_path):
    """--lr 100: the loss stays finite, every mask comes out empty (Dice 0): an error, not masks."""
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"every image's mask is empty: the UNet learned nothing"):
        train_masker.main(run_argv(wbc, out, "--epochs", "1", "--batch-size", "6", "--lr", "100"))
    assert not (out / "masks").exists() and not (out / "metrics.json").exists()
    assert not torch.load(out / "checkpoint.pt", weights_only=True)["finished"]


def test_masker_barely_trained_warns_and_writes_masks(wbc, tmp_path, capsys):
    """One step: every mask all cell. A warning (smoke tests and sweeps of a few steps go on); the
    classifier then refuses such masks where it needs them."""
    train_masker.main(run_argv(wbc, tmp_path / "out", "--epochs", "1", "--batch-size", "6"))
    assert "every image's mask is all cell: the UNet learned nothing yet" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "masks").glob("*/*/*.png"))) == 8


@pytest.mark.parametrize("flags", [["--alpha", "-1", "1"], ["--mask-mode", "channel"]])
def test_classifier_refuses_all_empty_masks(wbc, tmp_path, flags):
    root = shutil.copytree(wbc, tmp_path / "d")
    shutil.rmtree(root / "WBC_100" / "train" / "mask")   # the generated masks are used
    for image in (root / "WBC_100").glob("*/data/*/*.png"):
        split, cls = image.parts[-4], image.parts[-2]
        (tmp_path / "gen" / split / cls).mkdir(parents=True, exist_ok=True)
        empty = Image.fromarray(np.zeros((40, 40), np.uint8))
        empty.save(tmp_path / "gen" / split / cls / image.name)
    with pytest.raises(DataError) as e:
        train_classifier.main(run_argv(root, tmp_path / "out", "--masks", str(tmp_path / "gen"),
                                       *flags))
    assert str(tmp_path / "gen" / "train") in str(e.value) and "every mask is empty" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("script", ["train_classifier.py", "train_masker.py"])
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_signals_end_like_ctrl_c(wbc, tmp_path, monkeypatch, script, signum):
    """The script as __main__ gets the signal while it loads data: the Ctrl-C line, no traceback
    (runpy: in this process, so the test takes no start-up time; the handlers are put back)."""
    import signal
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    real = data.load_set

    def load_then_signal(*a, **k):
        os.kill(os.getpid(), getattr(signal, signum))
        return real(*a, **k)

    monkeypatch.setattr(data, "load_set", load_then_signal)
    monkeypatch.setattr(sys, "argv", [script, *run_argv(wbc, tmp_path / "out")])
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(HERE / script), run_name="__main__")
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)
        while data.HELD:
            data.HELD.pop().close()
    assert str(e.value) == "interrupted: --resume continues from the last checkpoint"


def test_sigterm_to_a_training_process(wbc, tmp_path):
    """A real process, SIGTERM once it trains: exit 1, the one line on stderr, no traceback."""
    import signal
    import subprocess
    argv = run_argv(wbc, tmp_path / "out", "--epochs", "1000")
    command = [sys.executable, str(HERE / "train_classifier.py"), *argv]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:   # "train 6 images ...": the data is loaded, training starts
        if line.startswith("train "):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip() == "interrupted: --resume continues from the last checkpoint", err


def test_masker_killed_while_writing_masks_resumes(wbc, tmp_path, monkeypatch, untrained_masks):
    """Killed after training, while writing masks: the checkpoint is not finished, and --resume
    writes the masks and metrics (no training)."""
    argv = run_argv(wbc, tmp_path / "out", "--epochs", "1", "--batch-size", "6")
    real = train_masker.save_mask_png

    def die(*a, **k):
        raise Killed

    monkeypatch.setattr(train_masker, "save_mask_png", die)
    with pytest.raises(Killed):
        train_masker.main(argv)
    while data.HELD:
        data.HELD.pop().close()
    assert not torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["finished"]
    monkeypatch.setattr(train_masker, "save_mask_png", real)
    metrics = train_masker.main(argv + ["--resume"])
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["finished"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    assert len(list((tmp_path / "out" / "masks").glob("*/*/*.png"))) == 8
    assert len(log_rows(tmp_path / "out" / "log.csv")) == 1


@pytest.mark.parametrize("epochs,steps,by_hand", [
    (5, 7, [f for f in (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625) for _ in range(5)]),
    (7, 1, [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]),
    (14, 1, [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625, 0.03125, 0.03125,
             0.015625, 0.015625]),
    (14, 2, [f for f in (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625) for _ in range(4)]),
])
def test_classifier_lr_halves_at_each_seventh(epochs, steps, by_hand):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = train_classifier.halving_schedule(optimizer, epochs * steps)
    seen = []
    for _ in range(epochs * steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == by_hand


def test_classifier_5_epochs_get_every_halving(wbc, tmp_path, monkeypatch):
    """5 epochs of 3 steps (15 steps): 7 lr levels, none skipped (per epoch, levels 3, 6 were)."""
    seen = []
    real = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    train_classifier.main(run_argv(wbc, tmp_path / "out", "--epochs", "5", "--batch-size", "2"))
    halvings = (0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6)   # floor(7 * step / 15), step 0..14
    levels = [0.003 * 0.5 ** k for k in halvings]
    assert seen == pytest.approx(levels)
