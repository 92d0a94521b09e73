"""Data of the WBC system: folder layout, decoding each image once, augmented batches, atomic file writes.

Layout: ROOT/WBC_<split>/train/{data,mask}/<Class>/<stem>.<ext>, validation in ROOT/WBC_100/val. Masks: cell =
8-bit value >= 64 (robust to JPEG noise; counts the 128 cytoplasm of 0/128/255 masks), a 0/1 mask when its max is 1,
palette index != 0. Decoded arrays are cached as .npy in --cache, keyed by each file's path, size,
mtime, ctime and inode."""
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
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)   # ITU-R 601 weights of R, G, B in brightness
CACHE_VERSION = 3   # bump when decoding changes, so stale caches are not reused
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")   # 16-bit and 32-bit grey
HELD = []   # this process's folder lock: one run per process at a time (a later one, in a test, drops the last's)

class DataError(Exception):
    """Bad input on disk (or a disk that refuses a write); the message names the path and what is wrong."""

def wbc_dirs(root, split):
    """Folders of one split: train data/mask of WBC_<split>, val data/mask of WBC_100."""
    if not Path(root).is_dir():
        raise DataError(f"{root}: data folder not found (make one with: python synth.py {root})")
    dirs = {f"{part}_{kind}": Path(root, f"WBC_{split}" if part == "train" else "WBC_100", part, kind)
            for part in ("train", "val") for kind in ("data", "mask")}
    for need in (d for d in (dirs["train_data"], dirs["val_data"]) if not d.is_dir()):
        raise DataError(f"{need}: folder not found (expected ROOT/WBC_<split>/train/data/<Class>/, ROOT/WBC_100/val)")
    return dirs

def is_image(path):
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")   # not .DS_Store's kin
def is_ignored(name):   # hidden and tool folders (debris of macOS, Jupyter) are never classes
    return name.startswith(".") or name in ("__MACOSX", ".ipynb_checkpoints")
def list_images(folder):   # every image under `folder`, any depth, sorted; hidden and tool folders skipped
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image(p)
                  and not any(is_ignored(part) for part in p.relative_to(folder).parts))

def image_keys(folder):
    """{(class, stem)} of the <folder>/<Class>/<image> files the loader reads (no hidden, tool or
    non-image files): what the epochs rule counts."""
    found = (f for f in Path(folder).glob("*/*") if f.is_file() and is_image(f))
    return {(f.parent.name, f.stem) for f in found if not is_ignored(f.parent.name)}

def scan_folder(folder, classes=None):
    """(paths, labels, classes, ignored) of <folder>/<Class>/<image>; classes=None: its sub-folders, sorted."""
    folder = Path(folder)
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not is_ignored(d.name)) if folder.is_dir() else []
    if not class_dirs:
        raise DataError(f"{folder}: {'no class sub-folders' if folder.is_dir() else 'folder not found'} "
                        f"(expected {folder}/<Class>/<image>)")
    names = [d.name for d in class_dirs]
    unknown = sorted(set(names) - set(names if classes is None else classes))
    if unknown:
        raise DataError(f"{folder}: class folder(s) {unknown} unknown to training (classes {list(classes)})")
    classes, paths, labels, ignored = list(classes or names), [], [], 0
    for d in class_dirs:
        found = [f for f in sorted(d.iterdir()) if f.is_file() and is_image(f)]
        ignored += sum(1 for _ in d.iterdir()) - len(found)
        if len({f.stem for f in found}) < len(found):   # x.jpg beside x.png: their masks (<stem>.png) would collide
            twins = [str(f) for f in found if [g.stem for g in found].count(f.stem) > 1]
            raise DataError(f"{' and '.join(twins)}: two images with one name; rename or remove one")
        if not found and names == classes:
            raise DataError(f"{d}: class folder has no images ({', '.join(sorted(IMAGE_EXTS))})")
        paths += found
        labels += [classes.index(d.name)] * len(found)
    return paths, labels, classes, ignored

def mask_root(root, data):
    """(data, mask) folders of a --pretrain-on ROOT: ROOT/train, ROOT/WBC_100/train or ROOT/CAM16/train."""
    found = [Path(root, sub) for sub in ("train", "WBC_100/train", "CAM16/train") if Path(root, sub, "mask").is_dir()]
    if not found:
        raise DataError(f"--pretrain-on {root}: no train/mask, WBC_100/train/mask or CAM16/train/mask under it")
    owner = found[0].resolve().parent   # the dataset's own WBC_*: more masks would break the split's budget
    if owner.name.startswith("WBC_") and owner.parent == Path(data).resolve():
        raise DataError(f"--pretrain-on {root}: {found[0]} holds the trained dataset's masks: over the split's budget")
    return found[0] / "data", found[0] / "mask"

def wide_to_8bit(a):
    """16/32-bit grey -> 0..255 float by the smallest bit depth (>= 8) holding the max: 12-bit data fills 8 bits."""
    bits = max(8, int(np.ceil(np.log2(float(max(0.0, np.nanmax(a, initial=0.0))) + 1))))
    return np.clip(a / (2.0 ** bits - 1) * 255, 0, 255)

def check_pixels(im):   # Pillow only warns up to 2x Image.MAX_IMAGE_PIXELS, in a decoding thread: refuse it
    if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels, over Image.MAX_IMAGE_PIXELS")

def decode_image(path, size):
    """(size, size, 3) uint8 upright (EXIF), any mode -> RGB (transparent -> white); and the original (w, h)."""
    with Image.open(path) as im:
        check_pixels(im)
        w, h = im.size[::-1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size   # EXIF 90-degree turns
        im.draft("RGB", (size, size))   # JPEG: libjpeg decodes at 1/2, 1/4.. scale, much faster; others: no-op
        im = ImageOps.exif_transpose(im)
        if im.mode in WIDE_MODES:
            im = Image.fromarray((wide_to_8bit(np.asarray(im, dtype=np.float64)) + 0.5).astype(np.uint8))
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=3.0)), (w, h)

def decode_mask(path, size):
    """(size, size) uint8 0/1 cell mask (encodings: the module docstring; a transparent pixel,
    alpha < 64, is background), nearest-resized; and the original (w, h)."""
    with Image.open(path) as im:
        check_pixels(im)
        im = ImageOps.exif_transpose(im)
        if im.mode in ("P", "1"):   # a palette index or a bit: anything but 0 is cell
            cell = np.asarray(im) != 0
        else:
            a = np.asarray(im, dtype=np.float64) if im.mode in WIDE_MODES else np.asarray(im.convert("L"))
            cell = a == 1 if a.max() == 1 else (wide_to_8bit(a) if im.mode in WIDE_MODES else a) >= 64
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            alpha = np.asarray(im.convert("RGBA"))[..., 3]
            cell = cell & (alpha >= 64)   # a (mostly) transparent pixel is background
    small = Image.fromarray(cell.astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(small), (cell.shape[1], cell.shape[0])

def decode_one(job):
    try:
        return (*(decode_image if job[0] == "image" else decode_mask)(*job[1:]), None)
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, EOFError... on corrupt files:
        return None, None, f"{type(e).__name__}: {e}"   # this one file is reported by name, not the whole run

def fingerprint(paths, extra=""):
    """Hash of each file's path, size, mtime, ctime and inode (not its bytes): the decode
    cache's key; --resume refuses changed data. ctime and inode catch a file swapped for one
    of the same size and mtime (cp -p, rsync -t): the OS sets them, a copy cannot. A chmod or
    a move changes them too: the cache decodes again, --resume refuses."""
    stats = (f"\n{os.path.abspath(p)} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"
             for p in paths for st in [os.stat(p)])
    return hashlib.sha1((f"{CACHE_VERSION} {extra}" + "".join(stats)).encode()).hexdigest()[:20]

def decode_all(kind, paths, size, cache_dir=None, log=print):
    """Decode every file once: (N, C, S, S) uint8 (C: 3 images, 1 masks), (w, h) sizes, {index: why} unreadable."""
    stem = Path(cache_dir) / f"{kind}-{fingerprint(paths, f'{kind} {size}')}" if cache_dir and paths else None
    if stem and Path(f"{stem}.json").exists():   # without a cache, no file is hashed
        try:
            meta = json.loads(Path(f"{stem}.json").read_text())
            return np.load(f"{stem}.npy"), [s and tuple(s) for s in meta[0]], dict(meta[1])
        except (OSError, ValueError, LookupError, TypeError, EOFError) as e:   # truncated by a disk full or a kill
            log(f"decode cache {stem}.npy unreadable ({type(e).__name__}); decoding again")
    out = np.zeros((len(paths), 3 if kind == "image" else 1, size, size), np.uint8)
    shapes, bad = [None] * len(paths), {}
    with ThreadPoolExecutor(os.cpu_count()) as pool:   # PIL decoders release the GIL
        for i, (array, shape, err) in enumerate(pool.map(decode_one, [(kind, p, size) for p in paths])):
            if err is None:
                out[i], shapes[i] = (array.transpose(2, 0, 1) if kind == "image" else array[None]), shape
            else:
                bad[i] = err
    if stem:
        try:   # a cache is a speed-up: a read-only or full disk only costs time
            atomic_write(f"{stem}.npy", lambda f: np.save(f, out))
            atomic_write(f"{stem}.json", lambda f: f.write(json.dumps([shapes, [*bad.items()]]).encode()))
        except DataError as e:
            log(f"warning: no decode cache ({e}); going on without it")
    return out, shapes, bad

@dataclass
class ImageSet:
    """images (N, 3, S, S) uint8, labels (N,), masks (N, 1, S, S) 0/1 or None, has_mask (N,) bool; lists."""
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    paths: list
    sizes: list
    classes: list
    fingerprint: str = ""

    def __len__(self):
        return len(self.paths)

    def subset(self, keep):
        """The items where the bool (N,) tensor `keep` is True."""
        idx, pick = keep.nonzero()[:, 0], keep.nonzero()[:, 0].tolist()
        return ImageSet(self.images[idx], self.labels[idx], None if self.masks is None else self.masks[idx],
                        self.has_mask[idx], [self.paths[i] for i in pick], [self.sizes[i] for i in pick],
                        self.classes, self.fingerprint)

def load_set(data_dir, size, classes=None, mask_dirs=(), cache_dir=None, skip_bad=False, log=print, need_masks=False):
    """<data_dir>/<Class>/<image> + the first <Class>/<stem>.* mask in mask_dirs, decoded; bad files stop it."""
    paths, labels, classes, ignored = scan_folder(data_dir, classes)
    log(f"{data_dir}: ignored {ignored} hidden or non-image file(s)") if ignored else None
    images, shapes, bad = decode_all("image", paths, size, cache_dir, log)
    listing = "".join(f"\n  {paths[i]}: {why}" for i, why in sorted(bad.items()))   # every unreadable file
    if bad and not skip_bad:
        raise DataError(f"{len(bad)} unreadable image file(s) (fix or remove them, or pass --skip-bad):{listing}")
    log(f"skipped {len(bad)} unreadable image file(s):{listing}") if bad else None
    listed = [f for d in map(Path, mask_dirs) if d.is_dir() for f in sorted(d.glob("*/*")) if is_image(f)]
    found = {(f.parent.name, f.stem): f for f in reversed(listed)}   # (class, stem) -> the first mask_dirs' mask
    mask_paths = [found.pop((classes[y], p.stem), None) for p, y in zip(paths, labels)]
    orphans = [str(f) for (cls, _), f in found.items() if not is_ignored(cls)]
    log(f"{len(orphans)} mask(s) match no image, ignored: {', '.join(orphans[:5])}"
        f"{' ...' * (len(orphans) > 5)}") if orphans else None
    where = [i for i, m in enumerate(mask_paths) if m is not None and i not in bad]
    masks, has = None, torch.zeros(len(paths), dtype=torch.bool)
    if where:
        decoded, mask_shapes, mask_bad = decode_all("mask", [mask_paths[i] for i in where], size, cache_dir, log)
        log(f"skipped {len(mask_bad)} unreadable mask file(s):" + "".join(f"\n  {mask_paths[where[j]]}: {why}" for j,
            why in sorted(mask_bad.items()))) if mask_bad else None   # a bad mask: that image has none
        masks = torch.zeros(len(paths), 1, size, size, dtype=torch.uint8)
        masks[where] = torch.from_numpy(decoded)
        has[[i for j, i in enumerate(where) if j not in mask_bad]] = True
        resized = sum(1 for j, i in enumerate(where) if j not in mask_bad and mask_shapes[j] != shapes[i])
        log(f"{resized} mask(s) differ in size from their image: resized with nearest-neighbour") if resized else None
    if len(bad) == len(paths):
        raise DataError(f"{data_dir}: none of its {len(bad)} image(s) could be read (see the list above)")
    full = ImageSet(torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), masks, has, paths, shapes,
                    classes, fingerprint(paths + [m for m in mask_paths if m is not None], str(size)))
    full = full.subset(torch.tensor([i not in bad for i in range(len(paths))])) if bad else full
    missing = (~full.has_mask).nonzero()[:, 0]
    if need_masks and len(missing):
        raise DataError(f"{len(missing)} of {len(full)} images of {data_dir} have no mask in "
                        f"{' or '.join(map(str, mask_dirs))}; draw them with train_masker.py (or point --masks there)")
    return full

def image_digests(images):
    """sha1 of each decoded uint8 image of (N, C, S, S): equal pixels, equal digest."""
    return [hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in np.asarray(images)]

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
    (train_path, val_path), more = leaks[0], len(leaks) - 1
    also = f" (and {more} more)" if more else ""
    raise DataError(f"{train_path} is the same image as the validation image {val_path}{also}: "
                    f"remove it from training (or from val)")

def batch_indices(n, batch_size, shuffle, drop_last=False):
    """Index tensors of one epoch's batches (torch's global RNG shuffles); drop_last: no ragged last batch."""
    stop = n - n % batch_size if drop_last and n > batch_size else n   # unless it is all: BatchNorm needs 2
    return list((torch.randperm(n) if shuffle else torch.arange(n))[:stop].split(batch_size))

def white_balance(x, share=0.1):
    """x (B, 3, H, W) in [0, 1] -> each image over the mean colour of its brightest `share` of pixels (by luma), the
    slide's background: a yellow or blue lamp cast turns white, so colour tells stain, not lamp."""
    luma = ((flat := x.flatten(2)) * x.new_tensor(LUMA)[:, None]).sum(1)   # flat (B, 3, P), luma (B, P)
    bright = (luma >= luma.topk(max(1, round(share * luma.shape[1])), 1).values[:, -1:])[:, None]   # (B, 1, P)
    return (x / ((flat * bright).sum(2) / bright.sum(2)).clamp_min(0.05)[..., None, None]).clamp(0, 1)

def make_batch(images, masks, idx, device, train, mask_channel=False, aug=None, part=slice(None),
               white=False):
    """Rows `part` of batch `idx` of uint8 images (N, 3, S, S), masks (N, 1, S, S) or None.

    Returns x (B, 3|4: mask_channel, S, S), m (B, 1, S, S) or None; white_balance()d if
    `white`; augmented if `train`, with the whole batch's draws (as one process draws them),
    but only rows `part` are copied to the device and augmented (data parallelism)."""
    params = None
    if train:   # every row's draws, so the RNG moves as one process's does
        params = draw_augment(len(idx), **(aug or {}))
    rows = idx[part]
    x = images[rows].to(device, non_blocking=True).float().div_(255)
    if white:
        x = white_balance(x)
    m = None if masks is None else masks[rows].to(device, non_blocking=True).float()
    if train:
        x, m = apply_augment(x, m, {name: value[part] for name, value in params.items()})
    x = (x - x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = torch.cat([x, m], dim=1) if mask_channel else x
    return x.contiguous(memory_format=torch.channels_last), m

@torch.inference_mode()
def infer(model, images, masks=None, batch_size=64, device="cpu", autocast=None, mask_channel=False, white=False):
    """model(x) in eval mode for every image, in order (no augmentation; white: balanced): float (N, ...) on the CPU."""
    model.eval()
    out = []
    for idx in batch_indices(len(images), batch_size, shuffle=False):
        x, _ = make_batch(images, masks if mask_channel else None, idx, device, False, mask_channel, white=white)
        with autocast or torch.autocast(x.device.type, enabled=False):   # the model only: inputs stay float32
            out.append(model(x).float().cpu())
    return torch.cat(out)

def augment(x, m=None, zoom=(0.75, 1.0), jitter=0.2, stain=0.0, blur=0.0):
    """x (B, 3, S, S) in [0, 1], m (B, 1, S, S) or None. Per sample: a crop of side `zoom` (> 1 zooms out), flips,
    brightness/contrast/saturation jitter; `stain`: hue turned up to stain*180 degrees, saturation x(1 +- stain), grey
    with probability stain/4; `blur`: Gaussian of sigma <= `blur` px. The mask follows (nearest: stays 0/1)."""
    return apply_augment(x, m, draw_augment(x.shape[0], zoom, jitter, stain, blur))

def draw_augment(b, zoom=(0.75, 1.0), jitter=0.2, stain=0.0, blur=0.0):
    """augment()'s random parameters for a batch of b, from torch's CPU RNG (the same draws on
    any device): CPU tensors of one row per sample, so rows of a batch can be augmented apart."""
    scale = torch.empty(b).uniform_(*zoom)
    shift = (torch.rand(b, 2) * 2 - 1) * (1 - scale).clamp_min(0)[:, None]   # crops stay inside
    flip = torch.where(torch.rand(b, 2) < 0.5, -1.0, 1.0)                    # (x-flip, y-flip)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * flip[:, 0]
    theta[:, 1, 1] = scale * flip[:, 1]
    theta[:, :, 2] = shift
    params = {"theta": theta}
    if jitter:   # (B, 3, 1, 1, 1): brightness, contrast, saturation
        factors = 1 + (torch.rand(3, b, 1, 1, 1) * 2 - 1) * jitter
        params["factors"] = factors.transpose(0, 1)
    if stain:   # turn the chroma plane of YIQ (hue), scale it (saturation), or drop it (grey)
        angle = (torch.rand(b) * 2 - 1) * stain * torch.pi
        sat = 1 + (torch.rand(b) * 2 - 1) * stain
        sat = torch.where(torch.rand(b) < stain / 4, 0.0, sat)
        turn = torch.zeros(b, 3, 3)
        turn[:, 0, 0] = 1
        turn[:, 1, 1] = sat * angle.cos()
        turn[:, 2, 2] = sat * angle.cos()
        turn[:, 1, 2] = -sat * angle.sin()
        turn[:, 2, 1] = sat * angle.sin()
        params["turn"] = turn
    if blur:   # each sample with its own sigma
        radius = max(1, round(2 * blur))
        sigma = (torch.rand(b) * blur).clamp_min(1e-3)
        offsets = torch.arange(-radius, radius + 1.0)[None]
        kernel = torch.exp(-offsets ** 2 / (2 * sigma[:, None] ** 2))
        params["kernel"] = kernel / kernel.sum(1, keepdim=True)               # (B, K)
    return params

def apply_augment(x, m, params):
    """augment() with draw_augment()'s `params` (their rows matching x's); x on any device."""
    b = x.shape[0]
    grid = F.affine_grid(params["theta"].to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if m is not None:   # nearest: the mask stays 0/1
        m = F.grid_sample(m, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    if "factors" in params:
        factors = params["factors"].to(x.device).transpose(0, 1)                # (3, B, 1, 1, 1)
        x = x * factors[0]
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * factors[1] + mean
        grey = LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]   # (B, 1, S, S)
        x = ((x - grey) * factors[2] + grey).clamp(0, 1)
    if "turn" in params:
        yiq = x.new_tensor([LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        turn = params["turn"].to(x.device)
        mix = torch.linalg.inv(yiq) @ turn @ yiq   # (B, 3, 3) RGB -> RGB
        x = torch.einsum("bij,bjhw->bihw", mix, x).clamp(0, 1)
    if "kernel" in params:   # one depthwise convolution along x, then one along y
        kernel = params["kernel"].to(x.device).repeat_interleave(3, 0)          # (B*3, K)
        radius = kernel.shape[1] // 2
        x = F.pad(x.reshape(1, b * 3, *x.shape[-2:]), (radius,) * 4, mode="reflect")
        x = F.conv2d(x, kernel[:, None, None, :], groups=b * 3)
        x = F.conv2d(x, kernel[:, None, :, None], groups=b * 3)
        x = x.reshape(b, 3, *x.shape[-2:])
    return x, m

def atomic_write(path, write):
    """write(file) into a temp file beside `path`, renamed over it: a kill or a full disk leaves the old file whole."""
    tmp = (path := Path(path)).with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:   # open(), unlike mkstemp, gives the umask's usual mode
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):   # a full disk, a read-only folder: one line, not a traceback
            raise DataError(f"{path}: could not write it ({e.strerror or e}); the previous file is intact") from None
        raise

def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))
def save_json(obj, path):
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

def save_csv(rows, path):   # same-keyed dicts, a header row
    writer = csv.DictWriter(text := io.StringIO(), fieldnames=[csv_cell(key) for key in rows[0]])
    writer.writeheader()
    writer.writerows([{csv_cell(k): csv_cell(v) for k, v in row.items()} for row in rows])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))

def save_mask_png(mask, path):   # (H, W) bool or 0/1 mask -> 0/255 PNG
    atomic_write(path, lambda f: Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(f, format="PNG"))

def load_checkpoint(path, required=(), resume_with=None, may_change=()):
    """torch.load(weights_only=True): no code in a checkpoint ever runs. Errors name the file. resume_with: flags of a
    run resuming it, refused if the checkpoint's run had other values (but for may_change) or has finished."""
    if not (path := Path(path)).is_file() or path.stat().st_size == 0:
        raise SystemExit(f"{path}: checkpoint {'is empty (0 bytes)' if path.is_file() else 'not found'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused pickle code, zip and EOF errors: the first sentence, never torch's advice
        refused = re.search(r"GLOBAL (\S+)", str(e))   # torch suggests an unsafe retry that would run the code
        why = str(e).strip().split(". ")[0][:200] + (f"; refused {refused[1]}" if refused else "")
        raise SystemExit(f"{path}: not a loadable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in ("model", "args", *required)):
        raise SystemExit(f"{path}: not a checkpoint of this repo (expected a dict with keys model, args, {required})")
    if not (isinstance(ckpt["model"], dict) and all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())):
        raise SystemExit(f"{path}: its 'model' entry is not a state dict (name -> tensor)")
    differ = [f"--{k.replace('_', '-')} ({ckpt['args'].get(k)!r} then, {v!r} now)" for k, v in
              (resume_with or {}).items() if k not in may_change and ckpt["args"].get(k) != v]
    if differ or (resume_with and ckpt.get("finished")):   # another run's state would give neither run's result
        raise SystemExit(f"--resume: {path} " + (f"was written with other {', '.join(differ)}; rerun with the same "
                                                 "flags" if differ else "is of a finished run") + " or another --out")
    return ckpt

def claim_folder(out):
    """Make and lock `out` (a second live run is refused; the OS drops a dead run's lock); clear its temp files."""
    HELD.pop().close() if HELD else None
    try:
        (out := Path(out)).mkdir(parents=True, exist_ok=True)
        HELD.append(lock := open(out / ".lock", "w"))
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"{out}: another run is writing into this folder; wait for it or use another --out") from None
    except OSError as e:
        raise DataError(f"{out}: cannot write there ({e.strerror or e})") from None
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- guidance: what the model sees

def grow_mask(m, px):
    """m (B, 1, S, S) in {0, 1} -> the mask grown by `px` pixels every way (a max-pool), (B, 1, S, S).

    A mask drawn by the masker may cut into the cell's edge: a few pixels more keep its rim."""
    if px == 0:
        return m
    return F.max_pool2d(m, kernel_size=2 * px + 1, stride=1, padding=px)


def blank_background(x, m, grow_px):
    """x (B, C, S, S) normalised, m (B, 1, S, S) -> (B, C, S, S): 0 outside the grown mask.

    0 after ImageNet normalisation is ImageNet's mean colour, one neutral value for every image, so
    the background carries nothing. An empty mask (the masker found no cell) keeps the whole image."""
    keep = grow_mask(m, grow_px)
    empty = keep.amax(dim=(1, 2, 3)) == 0   # (B,)
    keep = torch.where(empty[:, None, None, None], torch.ones_like(keep), keep)
    return x * keep


def mask_boxes(m, margin):
    """m (B, 1, S, S) -> (B, 3) float squares: centre x, centre y (pixel-edge coordinates), side.

    The square is centred on the mask's bounding box, its side (1 + 2 * margin) times the box's
    longer side. An empty mask gives the whole image."""
    size = m.shape[-1]
    index = torch.arange(size, device=m.device)
    rows = m.amax(dim=(1, 3)) > 0   # (B, S): rows that hold cell
    cols = m.amax(dim=(1, 2)) > 0   # (B, S): columns that hold cell
    top = torch.where(rows, index, size).amin(1)
    bottom = torch.where(rows, index, -1).amax(1) + 1
    left = torch.where(cols, index, size).amin(1)
    right = torch.where(cols, index, -1).amax(1) + 1
    side = torch.maximum(bottom - top, right - left).float() * (1 + 2 * margin)
    centre_x = (left + right).float() / 2
    centre_y = (top + bottom).float() / 2
    empty = ~rows.any(1)
    side = torch.where(empty, float(size), side)
    centre_x = torch.where(empty, size / 2, centre_x)
    centre_y = torch.where(empty, size / 2, centre_y)
    return torch.stack([centre_x, centre_y, side], dim=1)


def crop_boxes(x, boxes, size, mode="bilinear"):
    """x (B, C, S, S), boxes (B, 3) from mask_boxes -> (B, C, size, size): each square resized.

    Where a square leaves the image, its edge pixels repeat (padding_mode="border")."""
    full = x.shape[-1]
    centre = boxes[:, :2] * 2 / full - 1   # pixel edges -> grid_sample's [-1, 1]
    scale = boxes[:, 2] / full
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = centre
    grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------- test-time augmentation

def d4_views(x):
    """x (B, C, H, W) -> (8 * B, C, H, W): the 4 quarter turns of x, then of x flipped left-right.

    Cells have no preferred orientation, so all 8 views (the dihedral group D4) show the same cell."""
    flipped = x.flip(-1)
    turns = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    turns += [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)]
    return torch.cat(turns)


def d4_undo(maps):
    """maps (8 * B, C, H, W) of d4_views' images -> (8, B, C, H, W), each turned back upright."""
    views = maps.unflatten(0, (8, -1))
    upright = [torch.rot90(views[k], -k, dims=(-2, -1)) for k in range(4)]
    upright += [torch.rot90(views[4 + k], -k, dims=(-2, -1)).flip(-1) for k in range(4)]
    return torch.stack(upright)
