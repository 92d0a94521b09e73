"""Data: every mask encoding, layout rules, the decode cache, augmentation alignment."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import (DataError, augment, decode_all, decode_mask, fingerprint, list_images, load_set,
                  scan_folder)


def cell_square(size=16):
    """(size, size) bool: a centred square of cell."""
    m = np.zeros((size, size), bool)
    m[4:12, 5:11] = True
    return m


def save_encoded(path, encoding, cell):
    """Write the cell mask in one of the encodings seen in the wild."""
    if encoding == "0/255":
        Image.fromarray(cell.astype(np.uint8) * 255).save(path)
    elif encoding == "0/1":
        Image.fromarray(cell.astype(np.uint8)).save(path)
    elif encoding == "0/128/255":            # background / cytoplasm / nucleus (tecom300)
        a = cell.astype(np.uint8) * 128
        a[6:10, 7:9] = 255
        Image.fromarray(a).save(path)
    elif encoding == "palette":
        im = Image.fromarray(cell.astype(np.uint8), mode="L").convert("P")
        im.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
        im.save(path)
    elif encoding == "jpeg":                 # the course set: not cleanly binary
        Image.fromarray(cell.astype(np.uint8) * 255).save(path, quality=75)
    elif encoding == "rgb":
        Image.fromarray(np.repeat(cell.astype(np.uint8)[..., None] * 255, 3, 2)).save(path)
    elif encoding == "16bit":
        Image.fromarray(cell.astype(np.uint16) * 65535).save(path)
    elif encoding == "16bit 0/1":
        Image.fromarray(cell.astype(np.uint16)).save(path)


@pytest.mark.parametrize("encoding,ext", [("0/255", "png"), ("0/1", "png"), ("0/128/255", "png"), ("palette", "png"),
                                          ("jpeg", "jpg"), ("rgb", "png"), ("16bit", "png"), ("16bit 0/1", "png")])
def test_mask_encodings_read_as_cell(tmp_path, encoding, ext):
    cell = cell_square()
    path = tmp_path / f"m.{ext}"
    save_encoded(path, encoding, cell)
    mask, shape = decode_mask(path, 16)
    assert shape == (16, 16)
    if encoding == "jpeg":   # JPEG blurs the edges by a pixel at most
        assert (mask.astype(bool) != cell).mean() < 0.05
    else:
        assert np.array_equal(mask.astype(bool), cell)


def test_mask_resized_nearest_stays_binary(tmp_path):
    save_encoded(tmp_path / "m.png", "0/255", cell_square())
    mask, _ = decode_mask(tmp_path / "m.png", 32)
    assert set(np.unique(mask)) == {0, 1}
    assert mask.sum() == cell_square().sum() * 4


def write_image(path, color=(200, 100, 50), size=(20, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_scan_folder_ignores_hidden_and_non_images(tmp_path):
    write_image(tmp_path / "B" / "x.png")
    write_image(tmp_path / "A" / "y.JPG")
    (tmp_path / "A" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "A" / "notes.txt").write_text("hi")
    write_image(tmp_path / "__MACOSX" / "z.png")
    write_image(tmp_path / ".ipynb_checkpoints" / "z.png")
    paths, labels, classes, ignored = scan_folder(tmp_path)
    assert classes == ["A", "B"]
    assert [p.name for p in paths] == ["y.JPG", "x.png"] and labels == [0, 1]
    assert ignored == 2


@pytest.mark.parametrize("twin", ["x.png", "x.JPEG"])
def test_two_images_with_one_stem_are_refused_naming_both(tmp_path, twin):
    write_image(tmp_path / "A" / "x.jpg")
    write_image(tmp_path / "A" / "x.k.png")   # sorts between x.jpg and x.png: not a twin
    write_image(tmp_path / "A" / twin)
    with pytest.raises(DataError, match="two images with one name") as e:
        scan_folder(tmp_path)
    assert str(tmp_path / "A" / "x.jpg") in str(e.value) and str(tmp_path / "A" / twin) in str(e.value)


def test_unknown_val_class_is_an_error_missing_is_fine(tmp_path):
    write_image(tmp_path / "val" / "A" / "a.png")
    assert scan_folder(tmp_path / "val", classes=["A", "B"])[2] == ["A", "B"]
    write_image(tmp_path / "val" / "C" / "c.png")
    with pytest.raises(DataError, match="'C'"):
        scan_folder(tmp_path / "val", classes=["A", "B"])


def test_masks_matched_by_stem_and_orphans_reported(tmp_path):
    write_image(tmp_path / "data" / "A" / "one.jpg")
    write_image(tmp_path / "data" / "A" / "two.jpg")
    (tmp_path / "mask" / "A").mkdir(parents=True)
    save_encoded(tmp_path / "mask" / "A" / "one.png", "0/255", np.ones((20, 20), bool))
    save_encoded(tmp_path / "mask" / "A" / "ghost.png", "0/255", np.ones((20, 20), bool))
    logs = []
    s = load_set(tmp_path / "data", 16, mask_dirs=[tmp_path / "mask"], log=logs.append)
    assert s.has_mask.tolist() == [True, False]
    assert s.masks[0].all() and not s.masks[1].any()
    assert any("ghost.png" in line for line in logs)


def test_decode_cache_reused_and_invalidated(tmp_path):
    path = tmp_path / "A" / "a.png"
    write_image(path, (10, 20, 30))
    first, _, _ = decode_all("image", [path], 8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    again, _, _ = decode_all("image", [path], 8, cache_dir=tmp_path / "cache")
    assert np.array_equal(first, again) and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    write_image(path, (200, 20, 30))   # new content, new mtime: a new cache entry
    import os
    os.utime(path, ns=(1, 10**18))
    changed, _, _ = decode_all("image", [path], 8, cache_dir=tmp_path / "cache")
    assert changed[0, 0, 0, 0] == 200


def swap_same_size_same_mtime(path, color):
    """Replace `path` with another image of the same byte size and mtime (a BMP's size depends only
    on its width and height): what a copy with `cp -p` or a sync tool can do."""
    stat = path.stat()
    other = path.with_name("other.bmp")
    Image.new("RGB", (20, 20), color).save(other)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, path)
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_decode_cache_and_fingerprint_catch_a_same_size_same_mtime_swap(tmp_path):
    path = tmp_path / "A" / "a.bmp"
    path.parent.mkdir()
    Image.new("RGB", (20, 20), (10, 20, 30)).save(path)
    first, _, _ = decode_all("image", [path], 8, cache_dir=tmp_path / "cache")
    key = fingerprint([path])
    swap_same_size_same_mtime(path, (200, 20, 30))
    assert fingerprint([path]) != key   # --resume refuses the changed data
    changed, _, _ = decode_all("image", [path], 8, cache_dir=tmp_path / "cache")
    assert first[0, 0, 0, 0] == 10 and changed[0, 0, 0, 0] == 200


def test_augment_keeps_image_and_mask_aligned():
    """A picture whose red channel IS the mask: after crop and flips the two must still agree."""
    torch.manual_seed(0)
    m = torch.zeros(16, 1, 64, 64)
    for i in range(16):   # asymmetric blobs, so a flip of one but not the other would show
        m[i, 0, 5 + i:30 + i, 10:20 + 2 * i] = 1
        m[i, 0, 40:50, 40 + i // 2:55] = 1
    x = torch.cat([m, torch.zeros_like(m), torch.ones_like(m) * 0.5], 1)
    xa, ma = augment(x, m, jitter=0)
    assert set(ma.unique().tolist()) <= {0.0, 1.0}
    agree = ((xa[:, :1] > 0.5) == (ma > 0.5)).float().mean().item()
    assert agree > 0.98
    # and it really moved things: the augmented mask differs from the input
    assert (ma != m).float().mean() > 0.01
    # a sample's own crop: sample 0 and sample 1 did not get the same transform
    assert not torch.equal(ma[0] - m[0], ma[1] - m[1])


def test_augment_colour_jitter_stays_in_range():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    xa, m = augment(x, None, jitter=0.4)
    assert m is None and xa.shape == x.shape
    assert xa.min() >= 0 and xa.max() <= 1


def test_list_images_any_depth_skips_hidden_and_tool_folders(tmp_path):
    """The one walker of predict.py and sweep.py's leakage check: a Jupyter or macOS copy is not an image of the set."""
    for rel in ("A/a.png", "A/deep/b.jpg", "A/.ipynb_checkpoints/a-checkpoint.png", "__MACOSX/A/c.png", ".hidden/d.png",
                "A/.e.png", "A/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["A/a.png", "A/deep/b.jpg"]
    assert list_images(tmp_path / "missing") == []


def test_rgba_mask_transparent_pixels_are_background(tmp_path):
    """An annotation tool's RGBA export: white everywhere, the cell opaque, the rest
    transparent."""
    cell = cell_square()
    rgba = np.full((16, 16, 4), 255, np.uint8)
    rgba[..., 3] = cell * 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    got, _ = decode_mask(tmp_path / "m.png", 16)
    assert np.array_equal(got.astype(bool), cell)
