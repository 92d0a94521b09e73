"""Synthetic stand-in data for the WBC classification project: python synth.py ROOT [options].

Stained-blood-smear-like crops of the five white-blood-cell (WBC) classes, CAM16-like lymph-node
patches and unlabeled pRCC-like kidney patches, in the layout of the real datasets (JPEG images,
0/255 'L' PNG masks, all size x size):
  ROOT/WBC_100/{train,val}/{data,mask}/<Class>/<stem>.{jpg,png}  masks: ~10% of train, all of val
  ROOT/WBC_{50,10,1}/train/{data,mask}/<Class>/...               nested stratified subsets (hard links)
  ROOT/CAM16/{train,val,test}/data/{normal,tumor}/*.jpg          + CAM16/train/mask for ~10% of train
  ROOT/pRCC/*.jpg
Every image has its own RNG seeded from (seed, split, class, index), so a seed gives byte-identical files whatever
the worker count. confound=P tints TRAINING backgrounds by class with probability P (a shortcut-learning demo); val
backgrounds are always random. A ROOT that is not empty is refused; --force first removes the
folders above (WBC_*, CAM16, pRCC) and leaves any other file there.
"""
import argparse
import contextlib
import os
import shutil
import sys
import time
import zlib
from functools import lru_cache
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
WBC_COUNTS = {"Basophil": (176, 17, 36), "Eosinophil": (618, 61, 126), "Lymphocyte": (2015, 201, 412),
              "Monocyte": (466, 46, 95), "Neutrophil": (5172, 517, 1059)}  # train, train masks, val
SUBSETS = (("WBC_50", 0.5), ("WBC_10", 0.1), ("WBC_1", 0.01))
CAM_COUNTS, CAM_MASKS, PRCC_COUNT = {"train": 757, "val": 108, "test": 216}, 74, 1419
# Cell radius / image side. Ranges overlap so that size alone cannot name the class.
CELL_RADIUS = {"Basophil": (0.14, 0.21), "Eosinophil": (0.16, 0.24), "Lymphocyte": (0.13, 0.20),
               "Monocyte": (0.19, 0.27), "Neutrophil": (0.15, 0.23)}
# One background tint per class (RGB offsets): visible, but small next to the cell's own colours.
TINTS = np.array([[12, -5, -3], [-3, 8, -7], [-8, -3, 12], [6, 6, -12], [-10, 6, 6]], np.float32) / 255
BG, RBC, RBC_PALE = np.array([0.93, 0.86, 0.84]), np.array([0.86, 0.55, 0.58]), np.array([0.93, 0.76, 0.76])
NUCLEUS = np.array([0.36, 0.19, 0.48])  # haematoxylin purple, shared by every class
USAGE = ("python synth.py ROOT [--scale S] [--size PX] [--seed K] [--confound P] [--workers N] "
         "[--force]")
OWN_FOLDERS = ("WBC_100", "WBC_50", "WBC_10", "WBC_1", "CAM16", "pRCC")   # what --force removes


def _rng(seed, *keys):
    return np.random.default_rng([seed] + [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys])


@lru_cache(maxsize=4)
def _grid(size):
    return tuple(np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)  # (yy, xx) of the pixel centres


def _noise(rng, size, blob_px):
    """Smooth random field (zero mean, unit std) whose blobs are about blob_px pixels wide."""
    n = max(2, int(round(size / blob_px)))
    f = np.asarray(Image.fromarray(rng.standard_normal((n, n)).astype(np.float32)).resize((size, size), Image.BICUBIC))
    return (f - f.mean()) / (f.std() + 1e-6)


def _alpha(sdf):
    """Coverage from a signed distance (pixels): a 1-px antialiased edge, > 0.5 exactly where sdf < 0."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _paint(img, alpha, colour):
    img += (np.asarray(colour, np.float32) - img) * alpha[..., None]


def _tex(colour, noise, amount):
    return np.asarray(colour, np.float32) * (1 + amount * noise[..., None])


def _discs(u, v, cu, cv, r):
    """Signed distance to a union of discs, and distance / radius in the nearest disc (u, v: a grid row, column)."""
    d = np.sqrt((u[None] - cu[:, None, None]) ** 2 + (v[None] - cv[:, None, None]) ** 2) - r[:, None, None]
    k = d.argmin(0)
    near = np.take_along_axis(d, k[None], 0)[0]
    return near, (near + r[k]) / r[k]


def _chain(u, v, pts, r, width):
    """Signed distance to lobes (discs at pts) linked in order by thin strands of half-width `width`."""
    a, ab = pts[:-1, :, None, None], (pts[1:] - pts[:-1])[:, :, None, None]
    pu, pv = u[None] - a[:, 0], v[None] - a[:, 1]
    t = np.clip((pu * ab[:, 0] + pv * ab[:, 1]) / (ab[:, 0] ** 2 + ab[:, 1] ** 2 + 1e-6), 0, 1)
    strands = np.sqrt(((pu - t * ab[:, 0]) ** 2 + (pv - t * ab[:, 1]) ** 2).min(0)) - width
    return np.minimum(_discs(u, v, pts[:, 0], pts[:, 1], r)[0], strands)


def _granules(rng, size, blob_px, threshold):
    """Soft spots from a thresholded fine noise field: cheap, vectorised granules."""
    return np.clip((_noise(rng, size, blob_px) - threshold) * 2.5, 0, 1)


# Per cell type: (rng, cell-frame coords u/v in px, radius R, size) -> (cytoplasm colour, [(alpha, colour), ...]).
def _neutrophil(rng, u, v, R, size):
    n = rng.integers(3, 6)  # 3-5 lobes strung along a bent arc, linked by thin strands
    ang = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(2.4, 4.2), n)
    pts = R * rng.uniform(0.26, 0.44) * np.stack([np.cos(ang), np.sin(ang)], 1) + rng.normal(0, 0.04 * R, (n, 2))
    pts -= 0.5 * pts.mean(0)  # keep the nucleus roughly central
    nuc = _chain(u, v, pts, R * rng.uniform(0.22, 0.3, n), 0.07 * R)
    cyto = _tex([0.92, 0.81, 0.84], _noise(rng, size, size / 60), 0.03)  # faint fine granules
    return cyto, [(_alpha(nuc), _tex(NUCLEUS, _noise(rng, size, size / 25), 0.12))]


def _eosinophil(rng, u, v, R, size):
    sep = R * rng.uniform(0.28, 0.38)  # two lobes ("spectacles"), granules fill the cytoplasm
    pts = np.array([[-sep, 0], [sep, 0]]) + rng.normal(0, 0.05 * R, (2, 2)) + [0, R * rng.uniform(-0.2, 0.2)]
    nuc = _chain(u, v, pts, R * rng.uniform(0.25, 0.32, 2), 0.06 * R)
    grains = 0.9 * _granules(rng, size, size / 48, rng.uniform(-0.6, 0.2))  # granule load varies, always dense
    return [0.93, 0.70, 0.52], [(grains, _tex([0.95, 0.47, 0.18], _noise(rng, size, size / 20), 0.08)),
                                (_alpha(nuc), _tex(NUCLEUS, _noise(rng, size, size / 25), 0.12))]


def _basophil(rng, u, v, R, size):
    n = rng.integers(2, 4)  # lobed nucleus, then dark granules on top so it is hard to see
    pts = rng.normal(0, 0.18 * R, (n, 2))
    nuc = _chain(u, v, pts, R * rng.uniform(0.28, 0.36, n), 0.1 * R)
    dense = np.clip(1 - np.hypot(u, v) / R, 0, 1)  # granules pile up over the centre
    grains = 0.95 * _granules(rng, size, size / 42, 1.2 - 1.4 * dense - rng.uniform(0, 0.8))
    return [0.84, 0.76, 0.86], [(_alpha(nuc), [0.42, 0.26, 0.54]),
                                (grains, _tex([0.26, 0.11, 0.36], _noise(rng, size, size / 20), 0.1))]


def _lymphocyte(rng, u, v, R, size):
    rn, e = R * rng.uniform(0.68, 0.88), rng.uniform(0.88, 1.0)  # big round nucleus, thin blue rim
    off = rng.normal(0, 0.05 * R, 2)
    nuc = np.hypot((u - off[0]) * e, (v - off[1]) / e) - rn + 0.03 * R * _noise(rng, size, size / 8)
    nuc = np.maximum(nuc, rng.uniform(0, 0.15) * R - np.hypot(u - off[0], v - off[1] - rn))  # some are notched
    return [0.72, 0.74, 0.88], [(_alpha(nuc), _tex(NUCLEUS * 0.9, _noise(rng, size, size / 22), 0.12))]


def _monocyte(rng, u, v, R, size):
    a, b = R * rng.uniform(0.52, 0.66), R * rng.uniform(0.40, 0.50)  # kidney: an ellipse with a bite
    cu, cv = rng.normal(0, 0.06 * R, 2)
    ell = (np.hypot((u - cu) / a, (v - cv) / b) - 1) * b
    bu, bv = cu + rng.normal(0, 0.1 * a), cv + b * rng.uniform(0.95, 1.3)  # the bite sits on one long side
    bite = np.hypot(u - bu, v - bv) - R * rng.uniform(0.22, 0.4)
    vacuoles = 0.5 * _granules(rng, size, size / 16, 1.8)
    return _tex([0.66, 0.70, 0.80], _noise(rng, size, size / 30), 0.03), [
        (vacuoles, [0.92, 0.90, 0.94]),
        (_alpha(np.maximum(ell, -bite)), _tex(NUCLEUS * 1.25, _noise(rng, size, size / 18), 0.15))]


DRAWERS = dict(zip(CLASSES, (_basophil, _eosinophil, _lymphocyte, _monocyte, _neutrophil)))


def _red_cells(rng, img, scale):
    yy, xx = _grid(img.shape[0])
    n = rng.integers(2, 28)  # crowding varies from sparse to packed
    colour, pale = RBC + rng.normal(0, 0.02, 3), RBC_PALE + rng.normal(0, 0.02, 3)
    for layer in np.array_split(np.arange(n), 2):  # two layers so overlapping cells show their rims
        c = rng.uniform(-0.1, 1.1, (2, len(layer))) * img.shape[0]  # some spill over the border
        d, rel = _discs(xx[:1], yy[:, :1], c[0], c[1], scale * rng.uniform(0.075, 0.095, len(layer)))
        pallor = 0.7 * np.clip(1 - (rel / 0.6) ** 2, 0, 1)  # pale centre of the biconcave disc
        _paint(img, _alpha(d), colour + (pale - colour) * pallor[..., None])
    k = rng.integers(1, 5)  # platelets: small purple specks that a model must learn to ignore
    c = rng.uniform(0, img.shape[0], (2, k))
    d = _discs(xx[:1], yy[:, :1], c[0], c[1], scale * rng.uniform(0.012, 0.022, k))[0]
    _paint(img, 0.8 * _alpha(d), [0.55, 0.35, 0.62])


def draw_wbc(rng, size, cls, tint):
    """One smear crop with a single white cell of class `cls`: (float RGB image, bool cell mask)."""
    yy, xx = _grid(size)
    zoom = rng.uniform(0.8, 1.2)  # magnification: red and white cells scale together
    img = np.full((size, size, 3), BG + rng.normal(0, 0.01, 3) + tint, np.float32)
    img *= (1 + 0.02 * _noise(rng, size, size / 3))[..., None]  # uneven smear thickness
    _red_cells(rng, img, size * zoom)
    R = rng.uniform(*CELL_RADIUS[cls]) * size * zoom
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    th = rng.uniform(0, 2 * np.pi)  # rotate the cell's own frame
    u, v = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th), (yy - cy) * np.cos(th) - (xx - cx) * np.sin(th)
    e, phase = rng.uniform(0.9, 1.1), rng.uniform(0, 2 * np.pi, 2)
    rho, phi = np.hypot(u / e, v * e), np.arctan2(v, u)
    edge = R * (1 + 0.04 * np.sin(3 * phi + phase[0]) + 0.03 * np.sin(5 * phi + phase[1]))
    cell = _alpha(rho - edge)
    cyto, layers = DRAWERS[cls](rng, u, v, R, size)
    _paint(img, cell, np.asarray(cyto, np.float32) + rng.normal(0, 0.04, 3))  # cytoplasm stain varies too
    for alpha, colour in layers:
        _paint(img, alpha * cell, colour)  # clipped to the cell, so the mask is exactly the cell
    return img, rho < edge


def draw_cam(rng, size, tumor):
    """Lymph-node-like patch: small round lymphocyte nuclei; tumour = larger, darker, irregular ones."""
    img = np.full((size, size, 3), np.array([0.90, 0.68, 0.80]) + rng.normal(0, 0.02, 3), np.float32)
    img *= (1 + 0.06 * _noise(rng, size, size / 6))[..., None]  # eosin fibres, uneven staining
    region = np.zeros((size, size), bool)
    if tumor:
        field = _noise(rng, size, size / 2)
        region = field >= np.quantile(field, 1 - rng.uniform(0.3, 1.0))  # tumour covers 30-100%
    small = _granules(rng, size, size / 28, rng.uniform(0.7, 1.1))
    _paint(img, small * ~region, [0.36, 0.27, 0.58])
    step = size * rng.uniform(0.12, 0.15)  # tumour nuclei: packed on a jittered grid, big, irregular
    c = (np.mgrid[0:size:step, 0:size:step].reshape(2, -1) + rng.normal(0, 0.2 * step, (2, 1))).astype(np.float32)
    c += rng.uniform(-0.3, 0.3, c.shape) * step
    yy, xx = _grid(size)
    d = _discs(xx[:1], yy[:, :1], c[1], c[0], step * rng.uniform(0.3, 0.42, c.shape[1]))[0]
    big = _alpha(d + 0.1 * step * _noise(rng, size, size / 14))
    _paint(img, big * region, _tex([0.27, 0.12, 0.38], _noise(rng, size, size / 30), 0.2))
    return img, region


def draw_prcc(rng, size):
    """Kidney-like patch: papillae of purple-nucleated epithelium around pale lumens."""
    img = np.full((size, size, 3), np.array([0.86, 0.62, 0.74]) + rng.normal(0, 0.02, 3), np.float32)
    field = _noise(rng, size, size / rng.uniform(3, 6))
    _paint(img, np.clip((field - 0.7) * 3, 0, 1), [0.96, 0.93, 0.95])  # lumens
    band = np.clip(1 - np.abs(field - 0.2) * 2, 0, 1)  # epithelial lining next to the lumens
    _paint(img, band * _granules(rng, size, size / 20, 0.3), [0.33, 0.20, 0.50])
    return img, None


def _finish(rng, img):
    """Shared stain and scanner variation (hue, saturation, brightness, blur, noise) -> uint8 RGB."""
    h, sat = rng.normal(0, 0.06), rng.uniform(0.75, 1.2)
    k = np.full(3, 3 ** -0.5)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    hue = np.cos(h) * np.eye(3) + np.sin(h) * cross + (1 - np.cos(h)) * np.outer(k, k)  # rotate about grey
    grey = np.full((3, 3), 1 / 3)
    m = np.diag(rng.uniform(0.92, 1.06) * rng.uniform(0.985, 1.015, 3)) @ (grey + sat * (np.eye(3) - grey)) @ hue
    out = Image.fromarray(np.clip(img @ m.T.astype(np.float32) * 255 + 0.5, 0, 255).astype(np.uint8))
    out = np.asarray(out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.8) * img.shape[0] / 128)), np.float32)
    return np.clip(out + rng.normal(0, rng.uniform(1, 7), out.shape) + 0.5, 0, 255).astype(np.uint8)


def _tmp(path):
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def _save(path, arr, fmt, **kw):
    Image.fromarray(arr).save(_tmp(path), fmt, **kw)
    os.replace(_tmp(path), path)  # atomic: readers never see a half-written file


def _link(src, dst):
    try:
        os.link(src, _tmp(dst))
    except OSError:  # no hard links here (other filesystem, existing temp): copy instead
        shutil.copyfile(src, _tmp(dst))
    os.replace(_tmp(dst), dst)


def _make(job):
    """Draw and write one image (and its mask); a job is a plain tuple so it pickles to workers."""
    kind, split, cls, idx, seed, size, confound, img_path, mask_path = job
    rng = _rng(seed, kind + "/" + split, cls, idx)
    if kind == "wbc":
        agree, random_tint = rng.random(), rng.integers(len(CLASSES))  # both drawn: same cell at any confound
        t = CLASSES.index(cls) if split == "train" and agree < confound else random_tint
        img, mask = draw_wbc(rng, size, cls, TINTS[t])
    elif kind == "cam":
        img, mask = draw_cam(rng, size, cls == "tumor")
    else:
        img, mask = draw_prcc(rng, size)
    _save(img_path, _finish(rng, img), "JPEG", quality=92)
    if mask_path:
        _save(mask_path, mask.astype(np.uint8) * 255, "PNG")


def _count(summary, key, cls, masked):
    entry = summary.setdefault(key, {"images": 0, "masks": 0, "classes": {}})
    entry["images"], entry["masks"] = entry["images"] + 1, entry["masks"] + bool(masked)
    if cls:
        entry["classes"][cls] = entry["classes"].get(cls, 0) + 1


def write_synth(root, scale=0.1, size=128, seed=0, confound=0.0, workers=None):
    """Write the synthetic datasets under root; returns {split: {"images", "masks", "classes"}}."""
    if not (0 < scale < float("inf") and size >= 32 and 0 <= confound <= 1 and seed >= 0):
        raise ValueError("need 0 < scale < inf, size >= 32, 0 <= confound <= 1, seed >= 0")
    jobs, summary, wbc_train = [], {}, {}

    def add(kind, split, cls, idx, folder, stem, masked):
        img = os.path.join(root, folder, *(("data", cls) if cls else ()), stem + ".jpg")
        mask = os.path.join(root, folder, "mask", cls, stem + ".png") if masked else None
        jobs.append((kind, split, cls, idx, seed, size, float(confound), img, mask))
        _count(summary, folder, cls, masked)

    for cls in CLASSES:
        n_train, n_mask, n_val = WBC_COUNTS[cls]
        n_train, n_val = max(2, round(n_train * scale)), max(1, round(n_val * scale))
        n_mask = min(n_train, max(1, round(n_mask * scale)))
        masked = set(_rng(seed, "masks", cls).choice(n_train, n_mask, replace=False).tolist())
        wbc_train[cls] = (n_train, masked)
        for i in range(n_train):
            add("wbc", "train", cls, i, "WBC_100/train", f"{cls}_{i:06d}", i in masked)
        for i in range(n_train, n_train + n_val):  # val stems continue the numbering: all unique
            add("wbc", "val", cls, i, "WBC_100/val", f"{cls}_{i:06d}", True)
    for split, n in CAM_COUNTS.items():
        n = max(2, round(n * scale))
        m = max(1, round(CAM_MASKS * scale)) if split == "train" else 0  # ~10% of train, either class
        masked = set(_rng(seed, "cam-masks").permutation(n)[:m].tolist())
        for i in range(n):
            cls = "tumor" if i % 2 else "normal"
            add("cam", split, cls, i, f"CAM16/{split}", f"{split}_{cls}_{i:06d}", i in masked)
    for i in range(max(1, round(PRCC_COUNT * scale))):
        add("prcc", "all", "", i, "pRCC", f"pRCC_{i:06d}", False)
    for folder in {os.path.dirname(path) for job in jobs for path in job[7:] if path}:
        os.makedirs(folder, exist_ok=True)

    workers = workers or os.cpu_count() or 1
    with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        list(pool.imap_unordered(_make, jobs, chunksize=16) if pool else map(_make, jobs))

    for cls, (n_train, masked) in wbc_train.items():  # nested subsets: prefixes of one permutation
        order = _rng(seed, "subset", cls).permutation(n_train)
        for name, frac in SUBSETS:
            for i in order[:max(1, round(n_train * frac))].tolist():
                for sub, ext in [("data", "jpg")] + [("mask", "png")] * (i in masked):
                    src = os.path.join(root, "WBC_100", "train", sub, cls, f"{cls}_{i:06d}.{ext}")
                    dst = os.path.join(root, name, "train", sub, cls, os.path.basename(src))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    _link(src, dst)
                _count(summary, f"{name}/train", cls, i in masked)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="synth.py", usage=USAGE, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", metavar="ROOT", help="folder to write: new or empty (made if missing)")
    ap.add_argument("--scale", metavar="S", type=float, default=0.1,
                    help="fraction of the real dataset sizes, finite and > 0 (1 = full size; default 0.1)")
    ap.add_argument("--size", metavar="PX", type=int, default=128, help="image side in pixels, >= 32 (default 128)")
    ap.add_argument("--seed", metavar="K", type=int, default=0, help="random seed, >= 0; fixes every byte (default 0)")
    ap.add_argument("--confound", metavar="P", type=float, default=0.0,
                    help="probability in [0, 1] that a TRAIN image's background tint names its class (default 0)")
    ap.add_argument("--workers", metavar="N", type=int, help="processes (default: all CPUs); the output is the same")
    ap.add_argument("--force", action="store_true",
                    help="write into a ROOT that is not empty: replaces its WBC_*, CAM16, pRCC")
    a = ap.parse_args(argv)
    for flag, ok, rule in (("scale", 0 < a.scale < float("inf"), "finite and > 0"), ("size", a.size >= 32, ">= 32"),
                           ("seed", a.seed >= 0, ">= 0"), ("confound", 0 <= a.confound <= 1, "in [0, 1]"),
                           ("workers", a.workers is None or a.workers >= 1, ">= 1")):
        if not ok:
            ap.error(f"argument --{flag}: must be {rule}, got {getattr(a, flag)}")
    if not a.root or os.path.exists(a.root) and not os.path.isdir(a.root):
        sys.exit(f"error: ROOT must name a folder; {a.root!r} is {'an existing file' if a.root else 'empty'}")
    if os.path.isdir(a.root) and os.listdir(a.root) and not a.force:   # else two seeds mix on disk
        sys.exit(f"error: ROOT {a.root} is not empty; use a new folder, or --force to replace it")
    if a.force:
        for name in OWN_FOLDERS:
            shutil.rmtree(os.path.join(a.root, name), ignore_errors=True)
    start = time.time()
    try:  # write_synth makes every folder before it draws, so an unwritable ROOT fails at once
        summary = write_synth(a.root, a.scale, a.size, a.seed, a.confound, a.workers)
    except OSError as e:
        sys.exit(f"error: cannot write {e.filename or a.root}: {e.strerror or e}")
    for split, e in summary.items():
        classes = " ".join(f"{c}={n}" for c, n in e["classes"].items())
        print(f"{split:14s} {e['images']:6d} images {e['masks']:5d} masks  {classes}")
    print(f"wrote synthetic data to {a.root} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
