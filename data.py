"""Data for the WBC system: folder layout, decoding once into uint8 tensors, batch augmentation,
and the small file helpers both training scripts share (SPEC section 1).

Layout (see SPEC): ROOT/WBC_<split>/train/{data,mask}/<Class>/<stem>.<ext>, validation in
ROOT/WBC_100/val/{data,mask}; CAM16/{train,val,test}/{data,mask}/{normal,tumor}; pRCC/**.

    scan_folder(dir)              -> Listing of <Class>/<image> files (hidden, non-images ignored)
    load_set(dir, size, ...)      -> ImageSet: images (N, 3, S, S) uint8, labels (N,), masks (N, 1, S, S) uint8 0/1
    augment(x, m)                 -> random crop + flips (shared by image and mask) + colour jitter, per sample,
                                     whole batch at once on the batch's device
    python data.py synth ROOT     -> writes a synthetic dataset in this layout (synth.py)

Every image is decoded once per (files, size) and cached as a .npy under --cache (default
./.cache/decoded, never inside the dataset, which may be read-only or shared); a second run
reads the cache instead of decoding again.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import random
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
IGNORED_DIRS = {"__MACOSX", ".ipynb_checkpoints"}   # tool debris, never classes
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = (1, 10, 50, 100)
DEFAULT_CACHE = Path(".cache") / "decoded"


def cache_folder(flag):
    """The --cache flag -> a folder, or None for 'none' (no cache)."""
    return None if flag == "none" else Path(flag or DEFAULT_CACHE)


CACHE_VERSION = 2   # bump when decoding changes, so stale caches are not reused


class DataError(Exception):
    """Bad input on disk; the message names the path and what is wrong."""


# ---------------------------------------------------------------------------- layout

def wbc_dirs(root, split):
    """Folders of one split: train data/mask of WBC_<split>, val data/mask of WBC_100."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (make one with: python data.py synth {root})")
    train = root / f"WBC_{split}" / "train"
    val = root / "WBC_100" / "val"
    for need in (train / "data", val / "data"):
        if not need.is_dir():
            raise DataError(f"{need}: folder not found (expected ROOT/WBC_<split>/train/data/<Class>/ "
                            f"and ROOT/WBC_100/val/data/<Class>/)")
    return {"train_data": train / "data", "train_mask": train / "mask",
            "val_data": val / "data", "val_mask": val / "mask"}


def is_ignored(name):
    """Hidden files (.DS_Store) and tool folders are never images or classes."""
    return name.startswith(".") or name in IGNORED_DIRS


@dataclass
class Listing:
    paths: list      # image paths
    labels: list     # class index of each path
    classes: list    # class names, sorted
    ignored: int     # hidden or non-image files passed over


def scan_folder(folder, classes=None):
    """List <folder>/<Class>/<image> files.

    classes=None: the sub-folders define the classes (sorted); each must hold an image.
    classes given: the folder's classes must be among them (a missing one is fine).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected <Class>/<image> sub-folders)")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not is_ignored(d.name))
    if not class_dirs:
        raise DataError(f"{folder}: no class sub-folders (expected {folder}/<Class>/<image>)")
    names = [d.name for d in class_dirs]
    if classes is None:
        classes = names
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DataError(f"{folder}: class folder(s) {unknown} unknown to training (classes {list(classes)})")
    paths, labels, ignored = [], [], 0
    for d in class_dirs:
        found = 0
        for f in sorted(d.iterdir()):
            if f.is_file() and not is_ignored(f.name) and f.suffix.lower() in IMAGE_EXTS:
                paths.append(f)
                labels.append(classes.index(d.name))
                found += 1
            else:
                ignored += 1
        if found == 0 and classes is names:
            raise DataError(f"{d}: class folder has no images ({', '.join(sorted(IMAGE_EXTS))})")
    return Listing(paths, labels, list(classes), ignored)


def list_images(folder):
    """Every image under `folder`, recursively, hidden and tool folders skipped (pRCC: unlabeled)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not any(is_ignored(part) for part in p.relative_to(folder).parts))


def match_masks(listing, mask_dirs):
    """For each image, the first mask in mask_dirs with its <Class>/<stem> (any image ext), or None.

    Also returns the mask files that match no image (to be reported)."""
    found = [None] * len(listing.paths)
    index = {(listing.classes[y], p.stem): i for i, (p, y) in enumerate(zip(listing.paths, listing.labels))}
    orphans = []
    for mask_dir in mask_dirs:
        mask_dir = Path(mask_dir)
        if not mask_dir.is_dir():
            continue
        for f in sorted(mask_dir.glob("*/*")):
            if is_ignored(f.name) or is_ignored(f.parent.name) or f.suffix.lower() not in IMAGE_EXTS:
                continue
            i = index.get((f.parent.name, f.stem))
            if i is None:
                orphans.append(f)
            elif found[i] is None:
                found[i] = f
    return found, orphans


# ---------------------------------------------------------------------------- decoding

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")   # 16-bit and 32-bit grey


def wide_to_8bit(a):
    """Grey values of a 16/32-bit image -> float 0..255, scaled by the smallest bit depth (>= 8)
    that holds the maximum: 12-bit camera data (max <= 4095) fills the 8-bit range instead of
    becoming near-black (/65535) or all-white (clipped), and 0/255 stored as 16-bit stays 0/255."""
    top = float(max(0.0, np.nanmax(a, initial=0.0)))
    bits = max(8, int(np.ceil(np.log2(top + 1))))
    return np.clip(a / (2.0 ** bits - 1) * 255, 0, 255)


def to_rgb(im):
    """Any PIL mode -> RGB. 16-bit and 32-bit grey are scaled to 8 bits (wide_to_8bit), not clipped."""
    if im.mode in WIDE_MODES:
        im = Image.fromarray((wide_to_8bit(np.asarray(im, dtype=np.float64)) + 0.5).astype(np.uint8))
    if im.mode == "RGBA" or im.mode == "LA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)   # transparent = pale background, like a smear
    return im.convert("RGB")


def decode_image(path, size):
    """(size, size, 3) uint8 with EXIF orientation applied, and the upright original (w, h)."""
    with Image.open(path) as im:
        check_pixels(im)
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):   # EXIF 90-degree turns swap the sides
            w, h = h, w
        if im.format == "JPEG":
            im.draft("RGB", (size, size))   # libjpeg decodes at 1/2, 1/4.. scale: much faster
        rgb = to_rgb(ImageOps.exif_transpose(im)).resize((size, size), Image.BILINEAR, reducing_gap=3.0)
        return np.asarray(rgb), (w, h)


def mask_to_cell(im):
    """PIL mask -> bool array: True = cell (SPEC 1).

    Palette: index != 0. 8-bit: value >= 64 (robust to JPEG noise, counts a 128 cytoplasm
    level as cell), or == 1 when the maximum is 1 (a 0/1 mask). 16-bit: scaled to 8 bits first
    (wide_to_8bit, so 0/255, 0/4095 and 0/65535 all read as masks). Any other value is "stray":
    below 64 background, from 64 up cell.
    """
    if im.mode == "P":
        return np.asarray(im) != 0
    if im.mode == "1":
        return np.asarray(im).astype(bool)
    if im.mode in WIDE_MODES:
        a = np.asarray(im, dtype=np.float64)
        return a > 0 if a.max() <= 1 else wide_to_8bit(a) >= 64
    a = np.asarray(im.convert("L"))
    return a == 1 if a.max() == 1 else a >= 64


def decode_mask(path, size):
    """(size, size) uint8 0/1 cell mask, nearest-neighbour resized; also returns the original (w, h)."""
    with Image.open(path) as im:
        check_pixels(im)
        im = ImageOps.exif_transpose(im)
        cell = mask_to_cell(im)
    shape = (cell.shape[1], cell.shape[0])
    small = Image.fromarray(cell.astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(small), shape


def check_pixels(im):
    """Refuse an image over Image.MAX_IMAGE_PIXELS. Pillow itself only warns between 1x and 2x
    the limit (and raises above 2x); a warning in a decoding thread is easy to miss, so the
    limit is enforced here as stated. Never lifted: a bomb could exhaust the memory."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise Image.DecompressionBombError(f"{im.width}x{im.height} = {im.width * im.height} pixels, "
                                           f"limit {limit} (Image.MAX_IMAGE_PIXELS)")


def _decode_one(args):
    kind, path, size = args
    try:
        array, shape = (decode_image if kind == "image" else decode_mask)(path, size)
        return array, shape, None
    except Image.DecompressionBombError as e:
        return None, None, f"over Pillow's decompression-bomb limit ({e})"
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, EOFError, struct.error,
        # IndexError... on corrupt files; any of them means this one file is unreadable, and it is
        # reported by name and reason instead of killing the whole decode
        return None, None, f"{type(e).__name__}: {e}"


def cache_key(kind, paths, size):
    """Hash of what the decoded array depends on: the files (path, bytes, mtime) and the size."""
    h = hashlib.sha1(f"{CACHE_VERSION} {kind} {size}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"\n{os.path.abspath(p)} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def decode_all(kind, paths, size, cache_dir=None, workers=None, log=print):
    """Decode every file once: (N, C, S, S) uint8 array (C = 3 images, 1 masks), a list of
    original (w, h) sizes, and {index: reason} for files that could not be read.

    With cache_dir, the result is kept as <key>.npy + <key>.json and reused while the files
    and the size are unchanged."""
    channels = 3 if kind == "image" else 1
    if cache_dir is not None and paths:
        key = cache_key(kind, paths, size)
        npy, meta_path = Path(cache_dir) / f"{kind}-{key}.npy", Path(cache_dir) / f"{kind}-{key}.json"
        if npy.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            return np.load(npy), [tuple(s) if s else None for s in meta["shapes"]], \
                {int(k): v for k, v in meta["bad"].items()}
    out = np.zeros((len(paths), channels, size, size), np.uint8)
    shapes, bad = [None] * len(paths), {}
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:   # PIL decoders release the GIL
        for i, (array, shape, err) in enumerate(pool.map(_decode_one, [(kind, p, size) for p in paths])):
            if err is not None:
                bad[i] = err
                continue
            out[i] = array.transpose(2, 0, 1) if channels == 3 else array[None]
            shapes[i] = shape
    if cache_dir is not None and paths:
        try:   # a cache is a speed-up, not a requirement: a read-only or full disk only costs time
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            atomic_write(npy, lambda f: np.save(f, out))
            atomic_write(meta_path, lambda f: f.write(json.dumps({"shapes": shapes, "bad": bad}).encode()))
        except OSError as e:
            log(f"warning: could not write the decode cache in {cache_dir} ({e}); going on without it")
    return out, shapes, bad


# ---------------------------------------------------------------------------- datasets

@dataclass
class ImageSet:
    """A decoded labelled set. images (N, 3, S, S) uint8; labels (N,) int64; masks (N, 1, S, S)
    uint8 0/1 or None; has_mask (N,) bool; paths, original (w, h) sizes and classes as lists."""
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    paths: list
    sizes: list
    classes: list

    def __len__(self):
        return len(self.paths)

    def subset(self, keep):
        """The items where the bool (N,) tensor `keep` is True."""
        idx = keep.nonzero()[:, 0]
        return ImageSet(self.images[idx], self.labels[idx], None if self.masks is None else self.masks[idx],
                        self.has_mask[idx], [self.paths[i] for i in idx.tolist()],
                        [self.sizes[i] for i in idx.tolist()], self.classes)

    def class_counts(self):
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


def report_bad(bad, paths, what, skip_bad, log):
    """Raise DataError listing every unreadable file, or (skip_bad) log them and go on."""
    if not bad:
        return
    lines = "\n".join(f"  {paths[i]}: {why}" for i, why in sorted(bad.items()))
    if not skip_bad:
        raise DataError(f"{len(bad)} unreadable {what} file(s) (fix or remove them, or pass --skip-bad):\n{lines}")
    log(f"skipped {len(bad)} unreadable {what} file(s):\n{lines}")


def load_set(data_dir, size, classes=None, mask_dirs=(), cache_dir=None, skip_bad=False, log=print):
    """Decode <data_dir>/<Class>/<image> (and the first matching mask of each in mask_dirs)."""
    listing = scan_folder(data_dir, classes)
    if listing.ignored:
        log(f"{data_dir}: ignored {listing.ignored} hidden or non-image file(s)")
    images, shapes, bad = decode_all("image", listing.paths, size, cache_dir, log=log)
    report_bad(bad, listing.paths, "image", skip_bad, log)
    mask_paths, orphans = match_masks(listing, mask_dirs)
    if orphans:
        log(f"{len(orphans)} mask(s) match no image, ignored: {', '.join(map(str, orphans[:5]))}"
            + (" ..." if len(orphans) > 5 else ""))
    has = [m is not None and i not in bad for i, m in enumerate(mask_paths)]
    masks = None
    if any(has):
        where = [i for i, h in enumerate(has) if h]
        decoded, mask_shapes, mask_bad = decode_all("mask", [mask_paths[i] for i in where], size, cache_dir, log=log)
        report_bad(mask_bad, [mask_paths[i] for i in where], "mask", skip_bad, log)
        masks = np.zeros((len(listing.paths), 1, size, size), np.uint8)
        masks[where] = decoded
        resized = 0
        for j, i in enumerate(where):
            if j in mask_bad:
                has[i] = False
            elif shapes[i] is not None and mask_shapes[j] != tuple(shapes[i]):
                resized += 1
        if resized:
            log(f"{resized} mask(s) differ in size from their image: resized with nearest-neighbour")
    if len(bad) == len(listing.paths):
        raise DataError(f"{data_dir}: none of its {len(bad)} image(s) could be read (see the list above)")
    keep = torch.tensor([i not in bad for i in range(len(listing.paths))], dtype=torch.bool)
    full = ImageSet(torch.from_numpy(images), torch.tensor(listing.labels, dtype=torch.int64),
                    None if masks is None else torch.from_numpy(masks),
                    torch.tensor(has, dtype=torch.bool), listing.paths, shapes, listing.classes)
    return full if keep.all() else full.subset(keep)


# ---------------------------------------------------------------------------- batches and augmentation

def batch_indices(n, batch_size, shuffle, drop_last=False):
    """Index tensors of the batches of one epoch (torch's global RNG shuffles)."""
    order = torch.randperm(n) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def to_float(images, device):
    """uint8 (B, C, S, S) on any device -> float (B, C, S, S) in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(255)


def normalize(x):
    """[0, 1] RGB (B, 3, S, S) -> ImageNet-normalised, as torchvision's pretrained models expect."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def train_batches(n, batch_size, max_batches=None):
    """Shuffled index batches of one training epoch, at most max_batches of them. The ragged last
    batch is dropped when there is more than one batch: a batch of one breaks BatchNorm."""
    return batch_indices(n, batch_size, shuffle=True, drop_last=n > batch_size)[:max_batches]


def optimizer_step(loss, model, optimizer, clip_grad=0.0, scaler=None):
    """Backward, optional clipping of the gradients' total norm (0 = off), one optimizer step.
    With an enabled GradScaler (fp16 autocast) the loss is scaled so small fp16 gradients do not
    underflow, unscaled before clipping, and a step with Inf/NaN gradients is skipped."""
    optimizer.zero_grad(set_to_none=True)
    scaled = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if scaled else loss).backward()
    if clip_grad:
        if scaled:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaled:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


class FirstNonFinite:
    """The first step of an epoch whose loss was NaN or Inf, kept on the device: an `if` on the
    loss would wait for the GPU every step; result() reads it once, at the epoch-end sync, so the
    run can stop naming the step before a checkpoint is written from the broken weights."""

    def __init__(self, device):
        self.step = torch.full((), -1, device=device)
        self.loss = torch.zeros((), device=device)

    def update(self, step, loss):
        """Record `loss` (a 0-dim tensor) of 0-based `step` if it is the first non-finite one."""
        newly_bad = (self.step < 0) & ~torch.isfinite(loss)
        self.step = torch.where(newly_bad, step + 1, self.step)
        self.loss = torch.where(newly_bad, loss.float(), self.loss)

    def result(self, n_steps):
        """None, or (1-based step, n_steps, loss value) of the first non-finite loss."""
        first = int(self.step.item())
        return None if first < 0 else (first, n_steps, self.loss.item())


def make_batch(images, masks, idx, device, train, mask_channel=False, memory_format=torch.channels_last):
    """Batch `idx` of uint8 images (N, 3, S, S) and masks (N, 1, S, S) or None, on `device`:
    x (B, 3 or 4, S, S) normalised, in `memory_format` (the model's), augmented when `train`, the
    mask appended as 4th channel when `mask_channel`; and m (B, 1, S, S) float 0/1 or None."""
    x = to_float(images[idx], device)
    m = None if masks is None else masks[idx].to(device, non_blocking=True).float()
    if train:
        x, m = augment(x, m)
    x = normalize(x)
    if mask_channel:
        x = torch.cat([x, m], dim=1)
    return x.contiguous(memory_format=memory_format), m


@torch.inference_mode()
def infer(model, images, masks=None, batch_size=64, device="cpu", amp=contextlib.nullcontext(), mask_channel=False,
          memory_format=torch.channels_last):
    """model(x) in eval mode for every image, in order: float outputs (N, ...) on the CPU."""
    model.eval()
    out = []
    for idx in batch_indices(len(images), batch_size, shuffle=False):
        x, _ = make_batch(images, masks if mask_channel else None, idx, device, False, mask_channel, memory_format)
        with amp:
            out.append(model(x).float().cpu())
    return torch.cat(out)


def augment(x, m=None, crop=(0.75, 1.0), jitter=0.2):
    """Random crop (a zoom to a random square of side `crop` of the image, random position,
    resized back), horizontal and vertical flips, then brightness/contrast/saturation jitter.

    x (B, 3, S, S) float in [0, 1]; m (B, 1, S, S) float or None. Each sample draws its own
    parameters (torch's global CPU RNG, so runs are reproducible on any device); the geometric
    ones are applied to the mask too (nearest-neighbour, so it stays 0/1). One grid_sample for
    the whole batch: no per-sample Python work.
    """
    b = x.shape[0]
    scale = torch.empty(b).uniform_(*crop)
    shift = (torch.rand(b, 2) * 2 - 1) * (1 - scale)[:, None]     # crop stays inside the image
    flip = torch.where(torch.rand(b, 2) < 0.5, -1.0, 1.0)          # (x-flip, y-flip)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * flip[:, 0]
    theta[:, 1, 1] = scale * flip[:, 1]
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if m is not None:
        m = F.grid_sample(m, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    if jitter:
        factors = (1 + (torch.rand(3, b, 1, 1, 1) * 2 - 1) * jitter).to(x.device)  # brightness, contrast, saturation
        x = x * factors[0]
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * factors[1] + mean
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = ((x - grey) * factors[2] + grey).clamp_(0, 1)
    return x, m


# ---------------------------------------------------------------------------- files and runs

UMASK = os.umask(0o022)   # read once at import (os.umask can only be read by setting it) and put back
os.umask(UMASK)

def atomic_write(path, write):
    """Call write(file) on a temp file in path's folder, then rename it over path, so a kill
    mid-write leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)   # mkstemp's 0600 would hide results from the group: use open()'s mode
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj, path):
    """torch.save a plain dict atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_csv(rows, path):
    """A list of same-keyed dicts -> CSV with a header row, atomically."""
    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def save_mask_png(mask, path):
    """mask (S, S) bool/0-1 tensor or array -> 0/255 PNG, atomically."""
    array = (np.asarray(mask).astype(np.uint8) > 0).astype(np.uint8) * 255
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def load_checkpoint(path, required=("model", "args")):
    """torch.load with weights_only=True; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise SystemExit(f"{path}: checkpoint is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling (refused code), zip and EOF errors: name and reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SystemExit(f"{path}: not a loadable checkpoint ({type(e).__name__}: {first[:300]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise SystemExit(f"{path}: not a checkpoint of this repo (expected a dict with keys {list(required)})")
    if "model" in required and not (isinstance(ckpt["model"], dict)
                                    and all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())):
        raise SystemExit(f"{path}: its 'model' entry is not a state dict (name -> tensor)")
    if "args" in required and not isinstance(ckpt["args"], dict):
        raise SystemExit(f"{path}: its 'args' entry is not a dict of the run's settings")
    return ckpt


# ---------------------------------------------------------------------------- resuming a run

def plain_args(args):
    """vars(args) with Paths as strings: what a checkpoint stores (weights_only can load it)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def rng_state():
    """Every RNG training draws from, as tensors and plain lists (torch.load(weights_only=True)
    refuses numpy arrays): torch CPU (shuffling, augmentation), CUDA, Python, NumPy."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [version, list(internal), gauss],
            "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng(state):
    """Put back what rng_state() saved, so a resumed run draws the same batches and augmentations."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, cached))


RESUME_KEYS = ("model", "args", "epoch", "optimizer", "scheduler", "log_rows", "rng")


def load_resume(path, args, same):
    """The checkpoint to continue from with --resume; refuses one written with other settings
    (the args named in `same`), since continuing it would give neither run's result."""
    ckpt = load_checkpoint(path, required=RESUME_KEYS)
    now, then = plain_args(args), ckpt["args"]
    differ = [f"--{k.replace('_', '-')} {then.get(k)!r} then, {now[k]!r} now" for k in same if then.get(k) != now[k]]
    if differ:
        raise SystemExit(f"--resume: {path} was written with other settings ({'; '.join(differ)}); "
                         f"rerun with the same flags or use another --out")
    return ckpt


def save_every(epochs, every):
    """Epochs between resume checkpoints: `every`, or (0) about 20 saves per run, so a run of
    thousands of tiny epochs (WBC_1) does not spend its time writing 3x-model-size files."""
    return every or max(1, epochs // 20)


def nonfinite_error(where, step, n_steps, value, saved):
    """The message that stops a run whose loss became NaN or Inf."""
    keep = (f"the last good checkpoint is {saved[0]} (epoch {saved[1]})" if saved
            else "no checkpoint had been saved yet")
    return (f"error: {where} step {step}/{n_steps}: the loss is {value} (not finite); stopped, {keep}. "
            f"Try a lower --lr or --clip-grad")


def run_cli(main):
    """Run a script's main(): bad input on disk (DataError) ends as one `error: ...` line and exit
    status 1 instead of a traceback."""
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


def pick_device(name):
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def cpu_has_fast_bf16():
    """True where the CPU has bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision(device, amp="auto"):
    """(autocast context, name). auto: bf16 on CUDA (fp16 where bf16 is missing) and on CPUs with
    bf16 instructions, plain fp32 elsewhere."""
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "off"
    if amp == "off":
        return contextlib.nullcontext(), "off (fp32)"
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16), amp


def add_run_args(group, out_default, per="run"):
    """The run-control flags of both training scripts: seed, device, clipping, dry run, output
    folder, resume checkpoints. `per` ("run" or "stage") is what --save-every's auto mode counts in."""
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--clip-grad", type=float, default=0.0, metavar="MAX_NORM",
                       help="clip the gradients' total norm to MAX_NORM each step (0 = off)")
    group.add_argument("--dry-run", action="store_true", help="one batch per epoch, one epoch: checks the pipeline")
    group.add_argument("--out", default=None,
                       help=f"output folder (default runs/{out_default}; runs/dry_run/... with --dry-run)")
    group.add_argument("--save-every", type=int, default=0, metavar="N",
                       help="update OUT/checkpoint.pt (with optimizer and RNG states, for --resume) every N epochs "
                            f"and at the end of each {per} (0 = about 20 times per {per})")
    group.add_argument("--resume", action="store_true",
                       help="continue the run whose OUT/checkpoint.pt was left by a kill, with the same flags")


def check_run_args(parser, args):
    """Refuse run-control values no run can use (parser.error exits with status 2)."""
    if not (0 <= args.clip_grad < float("inf")) or args.save_every < 0:
        parser.error("--clip-grad and --save-every must be >= 0 (0 = off / auto)")


def add_compute_args(group):
    """The compute-path flags of both training scripts; Compute applies them and the run log lists them."""
    group.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                       help="autocast precision (auto: bf16 on CUDA and on CPUs with bf16 instructions, fp16 with "
                            "a grad scaler on CUDA without bf16, else off: fp32)")
    group.add_argument("--channels-last", default="on", choices=("on", "off"), help="NHWC model weights and batches")
    group.add_argument("--tf32", default="on", choices=("on", "off"), help="CUDA: TF32 matmuls and convolutions")
    group.add_argument("--cudnn-benchmark", default="on", choices=("on", "off"),
                       help="CUDA: cuDNN times its convolution algorithms on the first batches and keeps the fastest")
    group.add_argument("--adam", default="auto", choices=("auto", "fused", "foreach", "loop"),
                       help="Adam implementation (auto: fused on CUDA, foreach elsewhere); same maths, other kernels")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model (needs a C++ compiler on CPU; the first steps are slow)")


class Compute:
    """Where and how a training script runs its model (issue 4's compute path), from the flags of
    add_compute_args. `describe()` is the run log's line about it."""

    def __init__(self, args, device):
        self.device = device
        self.autocast, self.amp = precision(device, args.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        self.memory_format = torch.channels_last if args.channels_last == "on" else torch.contiguous_format
        self.compile = args.compile
        cuda = device.type == "cuda"
        if cuda:   # process-wide switches: set once here, by the script that owns the process
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
            torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
        self.adam_impl = ("fused" if cuda else "foreach") if args.adam == "auto" else args.adam
        self.settings = {"autocast": self.amp, "grad_scaler": "on" if self.scaler.is_enabled() else "off",
                         "channels_last": args.channels_last,
                         "tf32": args.tf32 if cuda else "n/a (cpu)",
                         "cudnn_benchmark": args.cudnn_benchmark if cuda else "n/a (cpu)",
                         "adam": self.adam_impl, "compile": "on" if self.compile else "off"}

    def describe(self):
        return " | ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.settings.items())

    def prepare(self, model, methods=("forward",)):
        """The model on the device in the chosen memory format; with --compile its `methods` are
        replaced by compiled ones on the instance, so state_dict keys (and checkpoints) stay as they are."""
        model = model.to(self.device, memory_format=self.memory_format)
        if self.compile:
            for name in methods:
                setattr(model, name, torch.compile(getattr(model, name)))
        return model

    def adam(self, params, lr):
        kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[self.adam_impl]
        return torch.optim.Adam(params, lr=lr, **kw)


def runs_folder(dry_run):
    """Default home of the scripts' outputs. A --dry-run's (one batch: untrained weights, useless
    masks) goes to runs/dry_run, so a real run never reads it by default."""
    return Path("runs/dry_run" if dry_run else "runs")


def split_epochs(base_epochs, n_split, n_full):
    """Epochs for a split of n_split images so that epochs x images matches base_epochs x n_full
    (SPEC 3: WBC_1 gets ~100x the epochs of WBC_100)."""
    return max(1, round(base_epochs * n_full / max(1, n_split)))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main():
    parser = argparse.ArgumentParser(description="Data tools. `synth ROOT` writes a synthetic dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    from synth import add_synth_args, main_synth
    synth = sub.add_parser("synth", help="write a synthetic WBC/CAM16/pRCC dataset in the SPEC layout")
    synth.add_argument("root", help="folder to write (created)")
    add_synth_args(synth)
    args = parser.parse_args()
    main_synth(args)


if __name__ == "__main__":
    sys.exit(main())
