"""Tests for synth.py on tiny synthetic sets (64 px, a few hundred images)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import synth

SCALE, SIZE = 0.02, 64
SUBSET_NAMES = ("WBC_100", "WBC_50", "WBC_10", "WBC_1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    summary = synth.write_synth(path, scale=SCALE, size=SIZE, seed=0, workers=2)
    return path, summary


@pytest.fixture(scope="module")
def confounded(tmp_path_factory):
    path = tmp_path_factory.mktemp("confound")
    synth.write_synth(path, scale=SCALE, size=SIZE, seed=0, confound=1.0, workers=2)
    return path


def stems(folder, ext):
    return {p.stem for p in Path(folder).glob(f"*.{ext}")}


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_layout_and_counts(root):
    path, summary = root
    for cls in synth.CLASSES:
        n_train, n_mask, n_val = synth.WBC_COUNTS[cls]
        train, val = path / "WBC_100/train", path / "WBC_100/val"
        assert len(stems(train / "data" / cls, "jpg")) == max(2, round(n_train * SCALE))
        assert len(stems(train / "mask" / cls, "png")) == max(1, round(n_mask * SCALE))
        assert len(stems(val / "data" / cls, "jpg")) == max(1, round(n_val * SCALE))
        assert summary["WBC_100/train"]["classes"][cls] == max(2, round(n_train * SCALE))
    for name in SUBSET_NAMES[1:]:
        assert not (path / name / "val").exists()
    for split, n in synth.CAM_COUNTS.items():
        got = {c: len(stems(path / "CAM16" / split / "data" / c, "jpg")) for c in ("normal", "tumor")}
        assert sum(got.values()) == max(2, round(n * SCALE)) and min(got.values()) >= 1
    assert len(stems(path / "CAM16/train/mask/normal", "png") | stems(path / "CAM16/train/mask/tumor", "png")) >= 1
    assert len(stems(path / "pRCC", "jpg")) == max(1, round(synth.PRCC_COUNT * SCALE))
    on_disk = {p.stem for p in path.rglob("*.jpg") if "WBC_100" in p.parts or "CAM16" in p.parts}
    assert len(on_disk) == sum(e["images"] for k, e in summary.items() if k.split("/")[0] in ("WBC_100", "CAM16"))
    assert not list(path.rglob("*.tmp")), "temporary files left behind"


def test_subsets_are_nested_and_stratified(root):
    path, _ = root
    for cls in synth.CLASSES:
        sets = [stems(path / name / "train/data" / cls, "jpg") for name in SUBSET_NAMES]
        masks = [stems(path / name / "train/mask" / cls, "png") for name in SUBSET_NAMES]
        for big, small in zip(sets, sets[1:]):
            assert small and small <= big
        for imgs, msk in zip(sets, masks):
            assert msk == imgs & masks[0], "a subset's masks must be exactly those of its images"
        stem = sorted(sets[-1])[0]
        a, b = path / "WBC_1/train/data" / cls / f"{stem}.jpg", path / "WBC_100/train/data" / cls / f"{stem}.jpg"
        assert a.read_bytes() == b.read_bytes()


def test_every_val_image_has_a_mask_and_every_mask_an_image(root):
    path, _ = root
    for folder in list(path.glob("WBC_*/*")) + list(path.glob("CAM16/*")):
        for cls_dir in (folder / "mask").glob("*"):
            assert stems(cls_dir, "png") <= stems(folder / "data" / cls_dir.name, "jpg")
    for cls in synth.CLASSES:
        val = path / "WBC_100/val"
        assert stems(val / "data" / cls, "jpg") == stems(val / "mask" / cls, "png")
    all_stems = [p.stem for p in path.glob("WBC_100/*/data/*/*.jpg")]
    assert len(all_stems) == len(set(all_stems)), "stems must be unique"


def test_image_and_mask_format(root):
    path, _ = root
    for p in list(path.glob("WBC_100/val/data/*/*.jpg"))[:5] + list(path.glob("pRCC/*.jpg"))[:2]:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
    for p in path.rglob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (SIZE, SIZE)
            assert set(np.unique(np.asarray(im))) <= {0, 255}


def test_masks_are_a_central_cell_of_plausible_size(root):
    path, _ = root
    for p in path.glob("WBC_100/val/mask/*/*.png"):
        m = np.asarray(Image.open(p)) > 0
        ys, xs = np.nonzero(m)
        assert 0.02 < m.mean() < 0.4, p.name
        assert abs(ys.mean() - SIZE / 2) < 0.15 * SIZE and abs(xs.mean() - SIZE / 2) < 0.15 * SIZE, p.name
        img = np.asarray(Image.open(str(p).replace("/mask/", "/data/").replace(".png", ".jpg")), np.float32)
        inside, ring = img[m].mean(0), np.concatenate([img[:2], img[-2:]]).reshape(-1, 3).mean(0)
        assert np.abs(inside - ring).sum() > 20, "the masked cell should look unlike the background"


def test_cell_size_depends_on_class(root):
    path, _ = root
    area = {c: np.mean([(np.asarray(Image.open(p)) > 0).mean() for p in path.glob(f"WBC_100/*/mask/{c}/*.png")])
            for c in synth.CLASSES}
    assert area["Lymphocyte"] < area["Neutrophil"] < area["Monocyte"]


def test_deterministic(tmp_path):
    kw = dict(scale=0.005, size=32)
    synth.write_synth(tmp_path / "a", seed=3, workers=2, **kw)
    synth.write_synth(tmp_path / "b", seed=3, workers=1, **kw)
    synth.write_synth(tmp_path / "c", seed=4, workers=2, **kw)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b, "same seed must give byte-identical files whatever the worker count"
    drawn = [k for k in a if k.suffix == ".jpg" and k.parts[0] in ("WBC_100", "CAM16", "pRCC")]  # seed-free stems
    assert all(k in c for k in drawn) and sum(a[k] != c[k] for k in drawn) > 0.9 * len(drawn)


def border_tints(root, split):
    """Chroma of each image's background, read off its outer 3-pixel ring (median skips red cells)."""
    feats, labels = [], []
    for ci, cls in enumerate(synth.CLASSES):
        for p in sorted((Path(root) / "WBC_100" / split / "data" / cls).glob("*.jpg")):
            a = np.asarray(Image.open(p), np.float32)
            edges = (a[:3], a[-3:], a[:, :3].transpose(1, 0, 2), a[:, -3:].transpose(1, 0, 2))
            ring = np.concatenate(edges).reshape(-1, 3)
            med = np.median(ring, 0)
            feats.append(med - med.mean())
            labels.append(ci)
    return np.array(feats), np.array(labels)


def nearest_centroid_accuracy(train, test):
    (xt, yt), (x, y) = train, test
    centroids = np.stack([xt[yt == k].mean(0) for k in range(len(synth.CLASSES))])
    return (np.linalg.norm(x[:, None] - centroids[None], axis=2).argmin(1) == y).mean()


def test_confound_makes_train_background_predict_class(root, confounded):
    train, val = border_tints(confounded, "train"), border_tints(confounded, "val")
    assert nearest_centroid_accuracy(train, train) > 0.85
    assert nearest_centroid_accuracy(train, val) < 0.5, "val backgrounds must stay unconfounded"
    plain = border_tints(root[0], "train")
    assert nearest_centroid_accuracy(plain, plain) < 0.5, "confound=0 must not tie tint to class"


def test_confound_changes_only_the_tint(root, confounded):
    a = np.asarray(Image.open(next((root[0] / "WBC_100/train/mask/Monocyte").glob("*.png"))))
    b = np.asarray(Image.open(next((confounded / "WBC_100/train/mask/Monocyte").glob("*.png"))))
    assert np.array_equal(a, b)


def run_cli(*args, cwd=None):
    script = Path(synth.__file__)
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or script.parent)


def test_write_synth_refuses_bad_values():
    for bad in (dict(scale=-1), dict(scale=float("inf")), dict(scale=float("nan")), dict(size=16), dict(confound=2)):
        with pytest.raises(ValueError):
            synth.write_synth("unused", **bad)
    assert not Path("unused").exists()


def test_command_line(tmp_path):
    done = run_cli(tmp_path / "out", "--scale", "0.005", "--size", "32", "--workers", "1", "--seed", "2",
                   "--confound", "0.5")
    assert done.returncode == 0, done.stderr
    assert "WBC_100/train" in done.stdout and "CAM16/test" in done.stdout and "WBC_1/train" in done.stdout
    assert (tmp_path / "out/WBC_1/train/data/Basophil").is_dir()
    synth.write_synth(tmp_path / "api", scale=0.005, size=32, seed=2, confound=0.5, workers=1)
    assert files(tmp_path / "out") == files(tmp_path / "api"), "the command must write what write_synth writes"
    refused = run_cli(tmp_path / "out", "--size", "8")  # the real process: an argparse error, then a sys.exit one
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1].startswith("synth.py: error: argument --size")
    refused = run_cli(next((tmp_path / "out/pRCC").glob("*.jpg")))
    assert refused.returncode == 1 and refused.stderr.startswith("error: ROOT") and refused.stderr.count("\n") == 1
    usage = run_cli("-h")
    assert usage.returncode == 0 and synth.USAGE in usage.stdout
    for flag in ("ROOT", "--scale", "--size", "--seed", "--confound", "--workers"):
        assert any(line.split()[:1] == [flag] for line in usage.stdout.splitlines()), f"no help for {flag}"


@pytest.mark.parametrize("args, needle", [
    (["--scale", "0"], "--scale"), (["--scale", "-0.5"], "--scale"), (["--scale", "nan"], "--scale"),
    (["--scale", "inf"], "--scale"), (["--scale", "x"], "--scale"), (["--size", "31"], "--size"),
    (["--size", "64.5"], "--size"), (["--seed", "-1"], "--seed"), (["--confound", "1.01"], "--confound"),
    (["--confound", "-0.1"], "--confound"), (["--confound", "nan"], "--confound"), (["--workers", "0"], "--workers"),
    ([], "ROOT")])
def test_command_line_refuses_bad_values(tmp_path, capsys, args, needle):
    root = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:  # in-process: any other exception (a traceback) fails the test
        synth.main([str(root)] * (needle != "ROOT") + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and needle in err[-1] and err[-1].startswith("synth.py: error:"), err
    assert not root.exists(), "nothing may be written after a refusal"


def unwritable(tmp_path):
    """A folder this process may not write in (root ignores permission bits, but not in /sys)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder if os.geteuid() else Path("/sys")


@pytest.mark.parametrize("case", ["empty", "file", "under_file", "read_only", "under_read_only"])
def test_command_line_refuses_bad_root(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # so that a wrongly accepted empty ROOT would write here
    (tmp_path / "file").write_text("keep me")
    read_only = unwritable(tmp_path)
    root = {"empty": "", "file": tmp_path / "file", "under_file": tmp_path / "file/sub", "read_only": read_only,
            "under_read_only": read_only / "synth_test_root"}[case]
    try:
        with pytest.raises(SystemExit) as stop:
            synth.main([str(root), "--scale", "0.005", "--size", "32", "--workers", "1"])
    finally:
        (tmp_path / "read_only").chmod(0o755)
    message = stop.value.code  # sys.exit(message): Python prints it to stderr and exits with status 1
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert (str(root) if root else "empty") in message, message
    assert (tmp_path / "file").read_text() == "keep me" and not list((tmp_path / "read_only").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "read_only"], "nothing may be written"


# ------------------------------------------------------------------------ review fixes (issue 19)

def test_non_empty_root_is_refused_unless_force(tmp_path, capsys):
    """Before: a second seed into the same ROOT mixed both on disk while the summary counted one."""
    root = tmp_path / "out"
    tiny = ["--scale", "0.005", "--size", "32", "--workers", "1"]
    synth.main([str(root), "--seed", "1"] + tiny)
    before = files(root)
    with pytest.raises(SystemExit) as stop:
        synth.main([str(root), "--seed", "2", "--scale", "0.01", "--size", "32", "--workers", "1"])
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert str(root) in message and "--force" in message
    assert files(root) == before   # nothing touched
    (root / "notes.txt").write_text("mine")
    capsys.readouterr()
    synth.main([str(root), "--seed", "2", "--force"] + tiny)
    lines = capsys.readouterr().out.splitlines()
    counted = [line.split() for line in lines if line.startswith(("WBC_", "CAM16"))]
    printed = {words[0]: int(words[1]) for words in counted}
    for split, n in printed.items():   # the summary counts what the disk holds: one seed's files
        on_disk = [p for p in (root / split).rglob("*.jpg")]
        assert len(on_disk) == n, split
    fresh = tmp_path / "fresh"
    synth.write_synth(fresh, scale=0.005, size=32, seed=2, workers=1)
    assert {k: v for k, v in files(root).items() if k.name != "notes.txt"} == files(fresh)
    assert (root / "notes.txt").read_text() == "mine"   # --force replaces synth's folders only
