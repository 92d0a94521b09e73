"""Data of the WBC system: the folder layout, decoding each image once, augmented batches,
atomic file writes, and the guidance helpers (mask boxes, test-time views).

Layout: ROOT/WBC_<split>/train/{data,mask}/<Class>/<stem>.<ext>, validation in ROOT/WBC_100/val.
Masks: cell = 8-bit value >= 64 (robust to JPEG noise; counts the 128 cytoplasm of 0/128/255
masks), a 0/1 mask when its max is 1, palette index != 0. Decoded arrays are cached as .npy in
--cache, keyed by each file's path, size, mtime, ctime and inode."""
import csv
import fcntl
import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SPLITS = (1, 10, 50, 100)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)   # ITU-R 601 weights of R, G, B in brightness
YIQ = (LUMA,                      # RGB -> Y: luma,
       (0.596, -0.274, -0.322),   # I: orange-blue,
       (0.211, -0.523, 0.312))    # Q: purple-green (NTSC's colour space)
CACHE_VERSION = 3   # bump when decoding changes, so stale caches are not reused
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")   # 16-bit and 32-bit grey
# The folder lock this process holds: one at a time (a later claim_folder, as in the tests, drops
# the earlier one).
HELD = []


class DataError(Exception):
    """Bad input on disk (or a disk that refuses a write); the message names the path and what is
    wrong."""


# ---------------------------------------------------------------------------- the folder layout

def wbc_dirs(root, split):
    """Folders of one split: train data/mask of WBC_<split>, val data/mask of WBC_100."""
    if not Path(root).is_dir():
        raise DataError(f"{root}: data folder not found (make one with: python synth.py {root})")
    train = Path(root, f"WBC_{split}", "train")
    val = Path(root, "WBC_100", "val")
    dirs = {
        "train_data": train / "data",
        "train_mask": train / "mask",
        "val_data": val / "data",
        "val_mask": val / "mask",
    }
    for need in (train / "data", val / "data"):
        if not need.is_dir():
            raise DataError(f"{need}: folder not found "
                            "(expected ROOT/WBC_<split>/train/data/<Class>/, ROOT/WBC_100/val)")
    return dirs


def is_image(path):
    """An image by its extension; hidden files are not: macOS's AppleDouble `._x.jpg` beside
    `x.jpg` holds metadata, not pixels."""
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def is_ignored(name):
    """Hidden and tool folders (debris of macOS, Jupyter's .ipynb_checkpoints) are never classes."""
    return name.startswith(".") or name == "__MACOSX"


def list_images(folder):
    """Every image under `folder`, any depth, sorted; hidden and tool folders skipped."""
    found = []
    for path in Path(folder).rglob("*"):
        parts = path.relative_to(folder).parts
        if path.is_file() and is_image(path) and not any(map(is_ignored, parts)):
            found.append(path)
    return sorted(found)


def image_keys(folder):
    """{(class, stem)} of the <folder>/<Class>/<image> files the loader reads (no hidden, tool or
    non-image files): what the epochs rule counts."""
    keys = set()
    for path in Path(folder).glob("*/*"):
        if path.is_file() and is_image(path) and not is_ignored(path.parent.name):
            keys.add((path.parent.name, path.stem))
    return keys


def class_folders(folder):
    """The sorted <folder>/<Class> sub-folders; an error when there are none."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected {folder}/<Class>/<image>)")
    found = sorted(d for d in folder.iterdir() if d.is_dir() and not is_ignored(d.name))
    if not found:
        raise DataError(f"{folder}: no class sub-folders (expected {folder}/<Class>/<image>)")
    return found


def check_unique_stems(images):
    """Refuse x.jpg beside x.png: their masks (<stem>.png) would collide."""
    stems = [f.stem for f in images]
    twins = [str(f) for f in images if stems.count(f.stem) > 1]
    if twins:
        raise DataError(f"{' and '.join(twins)}: two images with one name; rename or remove one")


def scan_folder(folder, classes=None):
    """(paths, labels, classes, ignored) of <folder>/<Class>/<image>; classes=None: its
    sub-folders, sorted. `ignored` counts the hidden and non-image files skipped."""
    folder = Path(folder)
    class_dirs = class_folders(folder)
    names = [d.name for d in class_dirs]
    classes = names if classes is None else list(classes)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(f"{folder}: class folder(s) {unknown} unknown to training "
                        f"(classes {classes})")
    paths = []
    labels = []
    ignored = 0
    for d in class_dirs:
        found = [f for f in sorted(d.iterdir()) if f.is_file() and is_image(f)]
        ignored += len(list(d.iterdir())) - len(found)
        check_unique_stems(found)
        if not found and names == classes:
            raise DataError(f"{d}: class folder has no images ({', '.join(sorted(IMAGE_EXTS))})")
        paths += found
        labels += [classes.index(d.name)] * len(found)
    return paths, labels, classes, ignored


def mask_root(root, data):
    """(data, mask) folders of a --pretrain-on ROOT: ROOT/train, ROOT/WBC_100/train or
    ROOT/CAM16/train."""
    subs = ("train", "WBC_100/train", "CAM16/train")
    found = [Path(root, sub) for sub in subs if Path(root, sub, "mask").is_dir()]
    if not found:
        raise DataError(f"--pretrain-on {root}: no train/mask, WBC_100/train/mask or "
                        "CAM16/train/mask under it")
    owner = found[0].resolve().parent
    # the dataset's own WBC_*: more masks would break the split's budget
    if owner.name.startswith("WBC_") and owner.parent == Path(data).resolve():
        raise DataError(f"--pretrain-on {root}: {found[0]} holds the trained dataset's masks: "
                        "over the split's budget")
    return found[0] / "data", found[0] / "mask"


# ---------------------------------------------------------------------------- decoding

def wide_to_8bit(a):
    """16/32-bit grey -> 0..255 float by the smallest bit depth (>= 8) holding the max: 12-bit data
    fills 8 bits."""
    peak = np.nanmax(a, initial=0.0)   # initial: never below 0
    bits = max(8, int(np.ceil(np.log2(peak + 1))))
    top = 2.0 ** bits - 1   # the largest value of that depth
    return np.clip(a / top * 255, 0, 255)


def check_pixels(im):
    """Refuse an image over Image.MAX_IMAGE_PIXELS: Pillow only warns up to twice that, and in a
    decoding thread."""
    if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels, "
                                           "over Image.MAX_IMAGE_PIXELS")


def decode_image(path, size):
    """(size, size, 3) uint8 upright (EXIF), any mode -> RGB (transparent -> white); and the
    original (w, h)."""
    with Image.open(path) as im:
        check_pixels(im)
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):   # EXIF orientations of a quarter turn
            w, h = h, w
        im.draft("RGB", (size, size))   # JPEG: libjpeg decodes at 1/2, 1/4.. scale, much faster
        im = ImageOps.exif_transpose(im)
        if im.mode in WIDE_MODES:
            grey = wide_to_8bit(np.asarray(im, dtype=np.float64))
            im = Image.fromarray((grey + 0.5).astype(np.uint8))   # + 0.5: rounded, not cut
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            white = Image.new("RGBA", im.size, "white")
            im = Image.alpha_composite(white, im.convert("RGBA"))
        im = im.convert("RGB")
        small = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
        return np.asarray(small), (w, h)


def mask_cells(im):
    """(H, W) bool: the cell pixels of a mask image in any encoding (the module docstring)."""
    if im.mode in ("P", "1"):   # a palette index or a bit: anything but 0 is cell
        return np.asarray(im) != 0
    if im.mode in WIDE_MODES:
        grey = np.asarray(im, dtype=np.float64)
    else:
        grey = np.asarray(im.convert("L"))
    if grey.max() == 1:   # a 0/1 mask
        return grey == 1
    if im.mode in WIDE_MODES:
        grey = wide_to_8bit(grey)
    return grey >= 64


def decode_mask(path, size):
    """(size, size) uint8 0/1 cell mask (encodings: the module docstring; a transparent pixel,
    alpha < 64, is background), nearest-resized; and the original (w, h)."""
    with Image.open(path) as im:
        check_pixels(im)
        im = ImageOps.exif_transpose(im)
        cell = mask_cells(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            alpha = np.asarray(im.convert("RGBA"))[..., 3]
            cell = cell & (alpha >= 64)
    image = Image.fromarray(cell.astype(np.uint8))
    small = image.resize((size, size), Image.NEAREST)   # nearest: stays 0/1
    return np.asarray(small), cell.shape[::-1]


def decode_one(job):
    """job (kind, path, size) -> (array, (w, h), None), or (None, None, why) when it will not
    decode: that one file is reported by name, not the whole run stopped."""
    kind, path, size = job
    decode = decode_image if kind == "image" else decode_mask
    try:
        array, shape = decode(path, size)
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, EOFError...
        return None, None, f"{type(e).__name__}: {e}"
    return array, shape, None


def fingerprint(paths, extra=""):
    """Hash of each file's path, size, mtime, ctime and inode (not its bytes): the decode
    cache's key; --resume refuses changed data. ctime and inode catch a file swapped for one
    of the same size and mtime (cp -p, rsync -t): the OS sets them, a copy cannot. A chmod or
    a move changes them too: the cache decodes again, --resume refuses."""
    lines = [f"{CACHE_VERSION} {extra}"]
    for path in paths:
        st = os.stat(path)
        lines.append(f"{os.path.abspath(path)} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} "
                     f"{st.st_ino}")
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:20]


def decode_files(kind, paths, size):
    """Decode every file once: (N, C, S, S) uint8 (C: 3 images, 1 masks), the original (w, h)
    sizes (None: unreadable), {index: why} of the unreadable files."""
    channels = 3 if kind == "image" else 1
    out = np.zeros((len(paths), channels, size, size), np.uint8)
    shapes = [None] * len(paths)
    bad = {}
    jobs = [(kind, path, size) for path in paths]
    with ThreadPoolExecutor(os.cpu_count()) as pool:   # PIL decoders release the GIL
        results = pool.map(decode_one, jobs)
        for i, (array, shape, why) in enumerate(results):
            if why is None:
                out[i] = np.atleast_3d(array).transpose(2, 0, 1)   # (S, S[, 3]) -> (C, S, S)
                shapes[i] = shape
            else:
                bad[i] = why
    return out, shapes, bad


def decode_all(kind, paths, size, cache_dir=None, log=print):
    """decode_files() with a cache: the arrays of these files are saved in `cache_dir` once and
    read back in later runs. A cache is a speed-up: a read-only or full disk only costs time."""
    if not cache_dir or not paths:   # without a cache, no file is hashed
        return decode_files(kind, paths, size)
    key = fingerprint(paths, f"{kind} {size}")
    prefix = Path(cache_dir) / f"{kind}-{key}"
    index = Path(f"{prefix}.json")   # the sizes and the unreadable files
    if index.exists():
        try:
            meta = json.loads(index.read_text())
            out = np.load(f"{prefix}.npy")
            shapes = [s and tuple(s) for s in meta[0]]   # JSON made each (w, h) a list
            return out, shapes, dict(meta[1])
        except (OSError, ValueError, LookupError, TypeError, EOFError) as e:   # truncated by a kill
            log(f"decode cache {prefix}.npy unreadable ({type(e).__name__}); decoding again")
    out, shapes, bad = decode_files(kind, paths, size)
    meta = json.dumps([shapes, list(bad.items())]).encode()
    try:
        atomic_write(f"{prefix}.npy", lambda f: np.save(f, out))
        atomic_write(index, lambda f: f.write(meta))
    except DataError as e:
        log(f"warning: no decode cache ({e}); going on without it")
    return out, shapes, bad


# ---------------------------------------------------------------------------- a set of images

@dataclass
class ImageSet:
    """images (N, 3, S, S) uint8, labels (N,), masks (N, 1, S, S) 0/1 or None, has_mask (N,) bool;
    paths, sizes (each image's original (w, h)) and classes lists."""
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    paths: list
    sizes: list
    classes: list
    fingerprint: str = ""

    def __len__(self):
        """The number of images."""
        return len(self.paths)

    def subset(self, keep):
        """The items where the bool (N,) tensor `keep` is True."""
        index = keep.nonzero()[:, 0]
        rows = index.tolist()
        masks = None if self.masks is None else self.masks[index]
        paths = [self.paths[i] for i in rows]
        sizes = [self.sizes[i] for i in rows]
        return ImageSet(self.images[index], self.labels[index], masks, self.has_mask[index], paths,
                        sizes, self.classes, self.fingerprint)


def report_bad(kind, paths, bad, skip_bad, log):
    """Stop on unreadable files (bad: {index: why} of `paths`) or, with skip_bad, log them; either
    way one line names each file."""
    listing = "".join(f"\n  {paths[i]}: {why}" for i, why in sorted(bad.items()))
    if not skip_bad:
        raise DataError(f"{len(bad)} unreadable {kind} file(s) (fix or remove them, or pass "
                        f"--skip-bad):{listing}")
    log(f"skipped {len(bad)} unreadable {kind} file(s):{listing}")


def match_masks(paths, labels, classes, mask_dirs, log):
    """Each image's mask file, or None: the first <Class>/<stem>.* in mask_dirs. Masks that
    match no image are logged."""
    listed = []
    for folder in map(Path, mask_dirs):
        if folder.is_dir():
            listed += [f for f in sorted(folder.glob("*/*")) if is_image(f)]
    # reversed: the first mask_dirs' mask of a (class, stem) is written last, so it wins
    found = {(f.parent.name, f.stem): f for f in reversed(listed)}
    keys = [(classes[y], p.stem) for p, y in zip(paths, labels)]
    mask_paths = [found.pop(key, None) for key in keys]   # pop: the masks left match no image
    orphans = [str(f) for (cls, _), f in found.items() if not is_ignored(cls)]
    if orphans:
        more = " ..." if len(orphans) > 5 else ""
        log(f"{len(orphans)} mask(s) match no image, ignored: {', '.join(orphans[:5])}{more}")
    return mask_paths


def load_masks(mask_paths, bad, shapes, size, cache_dir, log):
    """(masks (N, 1, S, S) uint8 or None, has_mask (N,) bool) of the images' mask files (None: no
    mask). An unreadable image (index in `bad`) or mask: that image has no mask."""
    has_mask = torch.zeros(len(mask_paths), dtype=torch.bool)
    where = [i for i, path in enumerate(mask_paths) if path is not None and i not in bad]
    if not where:
        return None, has_mask
    wanted = [mask_paths[i] for i in where]
    decoded, mask_shapes, mask_bad = decode_all("mask", wanted, size, cache_dir, log)
    if mask_bad:   # a bad mask is skipped: its image has none
        report_bad("mask", wanted, mask_bad, skip_bad=True, log=log)
    masks = torch.zeros(len(mask_paths), 1, size, size, dtype=torch.uint8)
    masks[where] = torch.from_numpy(decoded)
    # a shape of None: an unreadable mask
    has_mask[where] = torch.tensor([shape is not None for shape in mask_shapes])
    resized = sum(shape not in (None, shapes[i]) for shape, i in zip(mask_shapes, where))
    if resized:
        log(f"{resized} mask(s) differ in size from their image: resized with nearest-neighbour")
    return masks, has_mask


def load_set(data_dir, size, classes=None, mask_dirs=(), cache_dir=None, skip_bad=False,
             log=print, need_masks=False):
    """<data_dir>/<Class>/<image> + the first <Class>/<stem>.* mask in mask_dirs, decoded into an
    ImageSet; bad files stop it (skip_bad: they are left out)."""
    paths, labels, classes, ignored = scan_folder(data_dir, classes)
    if ignored:
        log(f"{data_dir}: ignored {ignored} hidden or non-image file(s)")
    images, shapes, bad = decode_all("image", paths, size, cache_dir, log)
    if bad:
        report_bad("image", paths, bad, skip_bad, log)
    mask_paths = match_masks(paths, labels, classes, mask_dirs, log)
    masks, has_mask = load_masks(mask_paths, bad, shapes, size, cache_dir, log)
    if len(bad) == len(paths):
        raise DataError(f"{data_dir}: none of its {len(bad)} image(s) could be read "
                        "(see the list above)")
    files = paths + [path for path in mask_paths if path is not None]
    full = ImageSet(
        images=torch.from_numpy(images),
        labels=torch.tensor(labels, dtype=torch.int64),
        masks=masks,
        has_mask=has_mask,
        paths=paths,
        sizes=shapes,
        classes=classes,
        fingerprint=fingerprint(files, str(size)),
    )
    if bad:
        keep = torch.tensor([i not in bad for i in range(len(paths))])
        full = full.subset(keep)
    missing = int((~full.has_mask).sum())
    if need_masks and missing:
        raise DataError(f"{missing} of {len(full)} images of {data_dir} have no mask in "
                        f"{' or '.join(map(str, mask_dirs))}; draw them with train_masker.py "
                        "(or point --masks there)")
    return full


def image_digests(images):
    """sha1 of each decoded uint8 image of (N, C, S, S): equal pixels, equal digest."""
    arrays = np.asarray(images)
    return [hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]


def find_leaks(val_images, val_paths, train_images, train_paths):
    """[(train path, val path)] of the training images whose decoded pixels equal a val image's: a
    copy under another name or re-saved losslessly (PNG -> BMP) is caught; a lossy re-encoding is
    not."""
    val = dict(zip(image_digests(val_images), val_paths))
    pairs = zip(train_paths, image_digests(train_images))
    return [(path, val[digest]) for path, digest in pairs if digest in val]


def check_no_leakage(val, *train_sets):
    """Refuse training ImageSets that hold an image of the val ImageSet (same pixels at the working
    size): the val scores would reward memorising it. One line names both files."""
    leaks = []
    for train in train_sets:
        leaks += find_leaks(val.images, val.paths, train.images, train.paths)
    if not leaks:
        return
    train_path, val_path = leaks[0]
    also = ""
    if len(leaks) > 1:
        also = f" (and {len(leaks) - 1} more)"
    raise DataError(f"{train_path} is the same image as the validation image {val_path}{also}: "
                    f"remove it from training (or from val)")


# ---------------------------------------------------------------------------- batches

def batch_indices(n, batch_size, shuffle, drop_last=False):
    """Index tensors of one epoch's batches (torch's global RNG shuffles); drop_last: no ragged
    last batch (a batch of 1 breaks BatchNorm), unless the set is smaller than a batch."""
    stop = n
    if drop_last and n > batch_size:
        stop = n - n % batch_size
    order = torch.randperm(n) if shuffle else torch.arange(n)
    return list(order[:stop].split(batch_size))


def white_balance(x, share=0.1):
    """x (B, 3, H, W) in [0, 1] -> each image over the mean colour of its brightest `share` of
    pixels (by luma), the slide's background: a yellow or blue lamp cast turns white, so colour
    tells stain, not lamp."""
    flat = x.flatten(2)                                      # (B, 3, P)
    luma = (flat * x.new_tensor(LUMA)[:, None]).sum(1)       # (B, P)
    count = max(1, round(share * luma.shape[1]))
    cutoff = luma.topk(count, 1).values[:, -1:]              # (B, 1): the count-th brightest
    bright = (luma >= cutoff)[:, None]                       # (B, 1, P)
    background = (flat * bright).sum(2) / bright.sum(2)      # (B, 3)
    background = background.clamp_min(0.05)[..., None, None]   # a dark slide: no blow-up
    return (x / background).clamp(0, 1)


def make_batch(images, masks, idx, device, train, mask_channel=False, aug=None, part=slice(None),
               white=False, guide=None):
    """Rows `part` of batch `idx` of uint8 images (N, 3, S, S), masks (N, 1, S, S) or None.

    Returns x (B, 3|4: mask_channel, S, S), m (B, 1, S, S) or None; white_balance()d if
    `white`; augmented if `train`, with the whole batch's draws (as one process draws them),
    but only rows `part` are copied to the device and augmented (data parallelism).
    guide (guide_for): ("crop", margin) crops each image to its mask's square before
    augmentation; ("input", px) blanks what lies outside the grown mask after it."""
    rows = idx[part]
    x = images[rows].to(device, non_blocking=True).float().div_(255)
    if white:
        x = white_balance(x)
    m = None
    if masks is not None:
        m = masks[rows].to(device, non_blocking=True).float()
    if guide and guide[0] == "crop":   # first: the cell fills the frame, then zoom and flips
        x, m = crop_to_mask(x, m, guide[1])
    if train:   # draws for all len(idx) rows, so the RNG moves as one process's does
        x, m = augment(x, m, **(aug or {}), n=len(idx), part=part)
    mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]   # as the pretrained encoder expects
    std = x.new_tensor(IMAGENET_STD)[:, None, None]
    x = (x - mean) / std
    if guide and guide[0] == "input":   # after augmentation, which moved the mask with the cell
        x = blank_background(x, m, guide[1])
    if mask_channel:
        x = torch.cat([x, m], dim=1)
    return x.contiguous(memory_format=torch.channels_last), m


@torch.inference_mode()
def infer(model, images, masks=None, batch_size=64, device="cpu", autocast=None,
          mask_channel=False, white=False, guide=None, tta=False):
    """model(x) in eval mode for every image, in order (no augmentation; white: balanced; guide:
    as make_batch's): float (N, ...) on the CPU. tta: the 8 views of d4_views in one forward
    pass, merged by tta_mean (batch_size counts views, so memory stays the same)."""
    model.eval()
    if not mask_channel and not guide:
        masks = None
    if tta:
        batch_size = max(1, batch_size // 8)
    out = []
    for idx in batch_indices(len(images), batch_size, shuffle=False):
        x, _ = make_batch(images, masks, idx, device, False, mask_channel, white=white,
                          guide=guide)
        if tta:
            x = d4_views(x).contiguous(memory_format=torch.channels_last)
        with autocast or torch.autocast(x.device.type, enabled=False):   # inputs stay float32
            y = model(x).float().cpu()
        if tta:
            y = tta_mean(y)
        out.append(y)
    return torch.cat(out)


# ---------------------------------------------------------------------------- augmentation
# Each step draws its random numbers from torch's CPU RNG for all n samples of the batch (the same
# draws on any device, and as one process draws them) and applies the rows `part` that x holds.

def symmetric(dims, scale):
    """A tensor of size `dims` drawn uniformly from [-scale, scale]."""
    return (torch.rand(dims) * 2 - 1) * scale


def affine(scale, shift):
    """scale, shift (B, 2) of x and y -> (B, 2, 3) affine_grid matrices [[sx, 0, tx],
    [0, sy, ty]]."""
    return torch.cat([torch.diag_embed(scale), shift[..., None]], dim=2)


def batch_crop_flip(x, m, n, part, zoom):
    """x (B, 3, S, S), m (B, 1, S, S) or None -> both cropped (side in `zoom`, > 1 zooms out) and
    flipped left-right and upside-down (each with probability 1/2) alike."""
    scale = torch.empty(n).uniform_(*zoom)
    room = (1 - scale).clamp_min(0)   # how far a crop can move and stay inside
    shift = symmetric((n, 2), room[:, None])
    flip = torch.where(torch.rand(n, 2) < 0.5, -1.0, 1.0)   # (n, 2): x-flip, y-flip
    theta = affine(scale[:, None] * flip, shift)   # (n, 2, 3)
    theta = theta[part].to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if m is not None:   # nearest: the mask stays 0/1
        m = F.grid_sample(m, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    return x, m


def batch_jitter(x, n, part, jitter):
    """x (B, 3, S, S) in [0, 1] -> brightness, contrast, saturation each scaled by 1 +- jitter."""
    factors = 1 + symmetric((3, n), jitter)   # (3, n)
    factors = factors[:, part, None, None, None].to(x.device)   # (3, B, 1, 1, 1)
    brightness, contrast, saturation = factors
    x = x * brightness
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    red, green, blue = x.split(1, dim=1)   # (B, 1, S, S) each
    grey = LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue
    return ((x - grey) * saturation + grey).clamp(0, 1)


def batch_stain(x, n, part, stain):
    """x (B, 3, S, S) in [0, 1] -> the chroma plane of its YIQ colour turned (hue, up to stain*180
    degrees), scaled (saturation x(1 +- stain)) or, with probability stain/4, dropped (grey)."""
    angle = symmetric(n, stain) * torch.pi
    saturation = 1 + symmetric(n, stain)
    saturation = torch.where(torch.rand(n) < stain / 4, 0.0, saturation)
    cos = saturation * angle.cos()
    sin = saturation * angle.sin()
    turn = torch.eye(3).repeat(n, 1, 1)   # luma stays
    chroma = torch.stack([cos, -sin, sin, cos], 1).view(n, 2, 2)   # turns and scales I and Q
    turn[:, 1:, 1:] = chroma
    yiq = x.new_tensor(YIQ)
    turn = turn[part].to(x.device)
    mix = torch.linalg.inv(yiq) @ turn @ yiq   # (B, 3, 3): RGB -> RGB
    return torch.einsum("bij,bjhw->bihw", mix, x).clamp(0, 1)


def batch_blur(x, n, part, blur):
    """x (B, 3, S, S) -> each image blurred by a Gaussian of its own sigma <= `blur` px: one
    depthwise convolution along x, then one along y."""
    radius = max(1, round(2 * blur))
    sigma = (torch.rand(n) * blur).clamp_min(1e-3)
    offsets = torch.arange(-radius, radius + 1.0)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma[:, None] ** 2))   # (n, K)
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = kernel[part].to(x.device)
    kernel = kernel.repeat_interleave(3, 0)   # (B*3, K): one per channel
    planes = x.flatten(0, 1)[None]   # (1, B*3, S, S): each channel of each image a plane
    planes = F.pad(planes, (radius,) * 4, mode="reflect")
    planes = F.conv2d(planes, kernel[:, None, None, :], groups=len(kernel))   # along x
    planes = F.conv2d(planes, kernel[:, None, :, None], groups=len(kernel))   # along y
    return planes.reshape_as(x)


def augment(x, m=None, zoom=(0.75, 1.0), jitter=0.2, stain=0.0, blur=0.0, n=None,
            part=slice(None)):
    """x (B, 3, S, S) in [0, 1], m (B, 1, S, S) or None. Per sample: a crop of side `zoom` (> 1
    zooms out), flips, brightness/contrast/saturation jitter; `stain`: hue turned up to stain*180
    degrees, saturation x(1 +- stain), grey with probability stain/4; `blur`: Gaussian of sigma
    <= `blur` px. The mask follows (nearest: stays 0/1). Draws for a batch of n (default B) of
    which x holds the rows `part`."""
    if n is None:
        n = len(x)
    x, m = batch_crop_flip(x, m, n, part, zoom)
    if jitter:
        x = batch_jitter(x, n, part, jitter)
    if stain:
        x = batch_stain(x, n, part, stain)
    if blur:
        x = batch_blur(x, n, part, blur)
    return x, m


# ---------------------------------------------------------------------------- files

def atomic_write(path, write):
    """write(file) into a temp file beside `path`, renamed over it: a kill or a full disk leaves
    the old file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:   # open(), unlike mkstemp, gives the umask's usual mode
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):   # a full disk, a read-only folder: one line, not a traceback
            raise DataError(f"{path}: could not write it ({e.strerror or e}); "
                            "the previous file is intact") from None
        raise


def save_checkpoint(obj, path):
    """torch.save(obj) to `path`, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path):
    """obj as indented JSON at `path`, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def csv_cell(value):
    """A text cell as a spreadsheet shows it, never runs it: one starting with = + - @ (a formula),
    a tab or a CR gets a leading quote. A file name's undecodable bytes (surrogate escapes) are
    written as \\xff, so the file stays UTF-8."""
    if not isinstance(value, str):
        return value
    text = os.fsencode(value).decode("utf-8", "backslashreplace")
    if text.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + text
    return text


def save_csv(rows, path):
    """Same-keyed dicts -> a CSV file with a header row."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[csv_cell(key) for key in rows[0]])
    writer.writeheader()
    cells = [{csv_cell(k): csv_cell(v) for k, v in row.items()} for row in rows]
    writer.writerows(cells)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def save_mask_png(mask, path):
    """(H, W) bool or 0/1 mask -> a 0/255 PNG."""
    cell = np.asarray(mask) > 0
    image = Image.fromarray(cell.astype(np.uint8) * 255)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def read_checkpoint(path):
    """torch.load(weights_only=True): no code in a checkpoint ever runs. A file it refuses stops
    the run with one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused pickle code, zip and EOF errors
        # the first sentence only: torch goes on to suggest an unsafe retry that would run the code
        why = str(e).strip().split(". ")[0][:200]
        refused = re.search(r"GLOBAL (\S+)", str(e))   # the pickled code it refused, by name
        if refused:
            why += f"; refused {refused[1]}"
        raise SystemExit(f"{path}: not a loadable checkpoint ({type(e).__name__}: {why})") from None


def check_resume(path, ckpt, resume_with, may_change):
    """Refuse to resume a checkpoint whose run had other flags (but for may_change) or has
    finished: another run's state would give neither run's result."""
    then = ckpt["args"]
    differ = []
    for k, v in resume_with.items():
        if k not in may_change and then.get(k) != v:
            differ.append(f"--{k.replace('_', '-')} ({then.get(k)!r} then, {v!r} now)")
    if differ:
        raise SystemExit(f"--resume: {path} was written with other {', '.join(differ)}; "
                         "rerun with the same flags or another --out")
    if ckpt.get("finished"):
        raise SystemExit(f"--resume: {path} is of a finished run; rerun with another --out")


def load_checkpoint(path, required=(), resume_with=None, may_change=()):
    """A checkpoint dict of this repo, loaded safely (read_checkpoint); errors name the file.
    resume_with: flags of a run resuming it (check_resume)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise SystemExit(f"{path}: checkpoint is empty (0 bytes)")
    ckpt = read_checkpoint(path)
    keys = ("model", "args", *required)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise SystemExit(f"{path}: not a checkpoint of this repo "
                         f"(expected a dict with keys model, args, {required})")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise SystemExit(f"{path}: its 'model' entry is not a state dict (name -> tensor)")
    if resume_with:
        check_resume(path, ckpt, resume_with, may_change)
    return ckpt


def claim_folder(out):
    """Make and lock `out` (a second live run is refused; the OS drops a dead run's lock); clear
    its temp files."""
    if HELD:
        HELD.pop().close()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")
        HELD.append(lock)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"{out}: another run is writing into this folder; "
                        "wait for it or use another --out") from None
    except OSError as e:
        raise DataError(f"{out}: cannot write there ({e.strerror or e})") from None
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


# -------------------------------------------------------------------- guidance: what the model sees

MARGIN = 0.15   # crop: the square is 15% of the cell's box wider on each side (its rim, a context)


def grow_px(size):
    """How far a mask grows, in px at the working size: a 32nd of the side (4 px at 128)."""
    return max(1, size // 32)


def guide_for(mask_mode, size):
    """make_batch's `guide` for a classifier's --mask-mode: ("input", px), ("crop", margin) or
    None (loss, channel: the model sees the whole image)."""
    if mask_mode == "input":
        return ("input", grow_px(size))
    if mask_mode == "crop":
        return ("crop", MARGIN)
    return None


def resize_masks(masks, size):
    """masks (N, 1, S, S) 0/1 -> (N, 1, size, size) uint8 0/1 (nearest: they stay 0/1)."""
    resized = F.interpolate(masks.float(), size=(size, size), mode="nearest")
    return resized.to(torch.uint8)


def crop_to_mask(x, m, margin):
    """x (B, 3, S, S), m (B, 1, S, S) -> both cropped to each mask's square (mask_boxes), at S."""
    boxes = mask_boxes(m, margin)
    size = x.shape[-1]
    cropped = crop_boxes(x, boxes, size)
    return cropped, crop_boxes(m, boxes, size, mode="nearest")


def grow_mask(m, px):
    """m (B, 1, S, S) in {0, 1} -> (B, 1, S, S): the mask grown by `px` pixels every way (a
    max-pool).

    A mask drawn by the masker may cut into the cell's edge: a few pixels more keep its rim."""
    if px == 0:
        return m
    return F.max_pool2d(m, kernel_size=2 * px + 1, stride=1, padding=px)


def blank_background(x, m, grow_px):
    """x (B, C, S, S) normalised, m (B, 1, S, S) -> (B, C, S, S): 0 outside the grown mask.

    0 after ImageNet normalisation is ImageNet's mean colour, one neutral value for every image,
    so the background carries nothing. An empty mask (the masker found no cell) keeps the whole
    image."""
    keep = grow_mask(m, grow_px)
    empty = keep.amax(dim=(1, 2, 3)) == 0   # (B,)
    keep = torch.where(empty[:, None, None, None], torch.ones_like(keep), keep)
    return x * keep


def span(hit):
    """hit (B, L) bool -> (first, last + 1) index of its True entries, each (B,)."""
    first = hit.int().argmax(1)   # argmax gives the first of equal maxima
    stop = hit.shape[1] - hit.flip(1).int().argmax(1)
    return first, stop


def mask_boxes(m, margin):
    """m (B, 1, S, S) -> (B, 3) float squares: centre x, centre y (pixel-edge coordinates), side.

    The square is centred on the mask's bounding box, its side (1 + 2 * margin) times the box's
    longer side. An empty mask gives the whole image."""
    size = m.shape[-1]
    top, bottom = span(m.amax(dim=(1, 3)) > 0)   # rows that hold cell
    left, right = span(m.amax(dim=(1, 2)) > 0)   # columns that hold cell
    longer = torch.maximum(bottom - top, right - left).float()
    side = longer * (1 + 2 * margin)
    centre = torch.stack([left + right, top + bottom], 1).float() / 2
    boxes = torch.cat([centre, side[:, None]], 1)
    whole = boxes.new_tensor([size / 2, size / 2, size])
    empty = m.amax(dim=(1, 2, 3)) <= 0
    return torch.where(empty[:, None], whole, boxes)


def crop_boxes(x, boxes, size, mode="bilinear"):
    """x (B, C, S, S), boxes (B, 3) from mask_boxes -> (B, C, size, size): each square resized.

    Where a square leaves the image, its edge pixels repeat (padding_mode="border")."""
    full = x.shape[-1]
    centre = boxes[:, :2] * 2 / full - 1   # pixel edges -> grid_sample's [-1, 1]
    scale = boxes[:, 2:] / full
    theta = affine(scale.expand(-1, 2), centre)
    grid_size = [len(x), x.shape[1], size, size]   # (B, C, size, size)
    grid = F.affine_grid(theta, grid_size, align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


# -------------------------------------------------------------------- test-time augmentation

def d4_views(x):
    """x (B, C, H, W) -> (8 * B, C, H, W): the 4 quarter turns of x, then of x flipped left-right.

    Cells have no preferred orientation, so all 8 views (the dihedral group D4) show the same
    cell."""
    flipped = x.flip(-1)
    views = [torch.rot90(image, k, dims=(-2, -1)) for image in (x, flipped) for k in range(4)]
    return torch.cat(views)


def d4_undo(maps):
    """maps (8 * B, C, H, W) of d4_views' images -> (8, B, C, H, W), each turned back upright."""
    views = maps.unflatten(0, (8, -1))   # (8, B, C, H, W)
    turns = [0, 1, 2, 3] * 2   # each view's quarter turns in d4_views
    upright = [torch.rot90(view, -k, dims=(-2, -1)) for view, k in zip(views, turns)]
    upright[4:] = [view.flip(-1) for view in upright[4:]]   # and the flipped half flipped back
    return torch.stack(upright)


def tta_mean(logits):
    """Logits of the mean probability over d4_views' 8 views.

    A classifier's (8 * B, C) -> (B, C): the log of the mean softmax. A masker's logit maps
    (8 * B, 1, H, W) -> (B, 1, H, W), each turned back upright first: the logit of the mean
    sigmoid. Probabilities are averaged, not logits: one sure view cannot outvote seven."""
    tiny = torch.finfo(logits.dtype).tiny   # a probability of 0 stays a finite logit
    if logits.ndim == 2:
        probs = logits.softmax(1).unflatten(0, (8, -1)).mean(0)   # (B, C)
        return probs.clamp_min(tiny).log()
    probs = d4_undo(logits.sigmoid()).mean(0)   # (B, 1, H, W)
    return torch.logit(probs, eps=1e-6)
