"""Synthetic stand-in data for the WBC classification project: python synth.py ROOT [options].

Stained-blood-smear-like crops of the five white-blood-cell (WBC) classes, CAM16-like lymph-node
patches and unlabeled pRCC-like kidney patches, in the layout of the real datasets (JPEG images,
0/255 'L' PNG masks, all size x size):
  ROOT/WBC_100/{train,val}/{data,mask}/<Class>/<stem>.{jpg,png}  masks: ~10% of train, all of val
  ROOT/WBC_{50,10,1}/train/{data,mask}/<Class>/...  nested stratified subsets (hard links)
  ROOT/CAM16/{train,val,test}/data/{normal,tumor}/*.jpg  + CAM16/train/mask for ~10% of train
  ROOT/pRCC/*.jpg
Every image has its own RNG seeded from (seed, split, class, index), so a seed gives
byte-identical files whatever the worker count. confound=P tints TRAINING backgrounds by class
with probability P (a shortcut-learning demo); val backgrounds are always random. A ROOT that is
not empty is refused; --force first removes the folders above (WBC_*, CAM16, pRCC) and leaves
any other file there.
"""
import argparse
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
# Per class: (train images, train masks, val images) of the real dataset.
WBC_COUNTS = {
    "Basophil": (176, 17, 36),
    "Eosinophil": (618, 61, 126),
    "Lymphocyte": (2015, 201, 412),
    "Monocyte": (466, 46, 95),
    "Neutrophil": (5172, 517, 1059),
}
SUBSETS = (("WBC_50", 0.5), ("WBC_10", 0.1), ("WBC_1", 0.01))
CAM_COUNTS = {"train": 757, "val": 108, "test": 216}
CAM_MASKS = 74
PRCC_COUNT = 1419
# Cell radius / image side. Ranges overlap so that size alone cannot name the class.
CELL_RADIUS = {
    "Basophil": (0.14, 0.21),
    "Eosinophil": (0.16, 0.24),
    "Lymphocyte": (0.13, 0.20),
    "Monocyte": (0.19, 0.27),
    "Neutrophil": (0.15, 0.23),
}
# One background tint per class (RGB offsets): visible, but small next to the cell's own colours.
TINTS = np.array([
    [12, -5, -3],
    [-3, 8, -7],
    [-8, -3, 12],
    [6, 6, -12],
    [-10, 6, 6],
], np.float32) / 255
BG = np.array([0.93, 0.86, 0.84])   # the smear's pale pink background
RBC = np.array([0.86, 0.55, 0.58])   # red cell rim
RBC_PALE = np.array([0.93, 0.76, 0.76])   # red cell centre
NUCLEUS = np.array([0.36, 0.19, 0.48])  # haematoxylin purple, shared by every class
USAGE = ("python synth.py ROOT [--scale S] [--size PX] [--seed K] [--confound P] [--workers N] "
         "[--force]")
OWN_FOLDERS = ("WBC_100", "WBC_50", "WBC_10", "WBC_1", "CAM16", "pRCC")   # what --force removes


def _rng(seed, *keys):
    """A generator of its own for (seed, *keys); a string key enters as its CRC32."""
    words = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed] + words)


@lru_cache(maxsize=4)
def _grid(size):
    """(yy, xx), each (size, size) float32: the pixel centres' coordinates."""
    return tuple(np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)


def _noise(rng, size, blob_px):
    """Smooth random field (zero mean, unit std) whose blobs are about blob_px pixels wide."""
    n = max(2, int(round(size / blob_px)))
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    smooth = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    field = np.asarray(smooth)
    return (field - field.mean()) / (field.std() + 1e-6)


def _alpha(sdf):
    """Coverage from a signed distance (pixels): a 1-px antialiased edge, > 0.5 exactly where
    sdf < 0."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _paint(img, alpha, colour):
    """Blend `colour` into img (H, W, 3) in place, by alpha (H, W)."""
    img += (np.asarray(colour, np.float32) - img) * alpha[..., None]


def _tex(colour, noise, amount):
    """A colour (3,) made uneven by a noise field (H, W): (H, W, 3)."""
    return np.asarray(colour, np.float32) * (1 + amount * noise[..., None])


def _discs(u, v, cu, cv, r):
    """(signed distance to a union of discs, distance from the nearest disc's centre / its
    radius), each (H, W). u, v: pixel coordinates that broadcast to (H, W) (a row and a column
    of the grid, or whole maps); cu, cv, r: the discs' centres and radii, each (K,)."""
    du = u[None] - cu[:, None, None]
    dv = v[None] - cv[:, None, None]
    d = np.sqrt(du ** 2 + dv ** 2) - r[:, None, None]   # (K, H, W)
    k = d.argmin(0)   # the nearest disc of each pixel
    near = np.take_along_axis(d, k[None], 0)[0]
    rel = (near + r[k]) / r[k]
    return near, rel


def _discs_on_grid(size, cu, cv, r):
    """_discs over every pixel of a (size, size) image: cu along x, cv along y."""
    yy, xx = _grid(size)
    return _discs(xx[:1], yy[:, :1], cu, cv, r)


def _chain(u, v, pts, r, width):
    """Signed distance to lobes (discs at pts (K, 2)) linked in order by thin strands of
    half-width `width`."""
    a = pts[:-1, :, None, None]   # each strand's start
    ab = (pts[1:] - pts[:-1])[:, :, None, None]   # and its direction
    abu = ab[:, 0]
    abv = ab[:, 1]
    pu = u[None] - a[:, 0]
    pv = v[None] - a[:, 1]
    length2 = abu ** 2 + abv ** 2 + 1e-6
    projection = (pu * abu + pv * abv) / length2
    t = np.clip(projection, 0, 1)   # the nearest point of each strand, as a fraction of its length
    du = pu - t * abu
    dv = pv - t * abv
    nearest2 = (du ** 2 + dv ** 2).min(0)   # squared distance to the nearest strand
    strands = np.sqrt(nearest2) - width
    lobes, _ = _discs(u, v, pts[:, 0], pts[:, 1], r)
    return np.minimum(lobes, strands)


def _granules(rng, size, blob_px, threshold):
    """Soft spots from a thresholded fine noise field: cheap, vectorised granules."""
    field = _noise(rng, size, blob_px)
    return np.clip((field - threshold) * 2.5, 0, 1)


# Per cell type: (rng, cell-frame coords u/v in px, radius R, size)
#   -> (cytoplasm colour, [(alpha, colour), ...] painted in order over it).
# Each reads from rng in a fixed order: reordering the lines changes every image of a seed.
def _neutrophil(rng, u, v, R, size):
    """3-5 lobes strung along a bent arc, linked by thin strands."""
    n = rng.integers(3, 6)
    first = rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(2.4, 4.2)
    ang = first + np.linspace(0, bend, n)
    reach = R * rng.uniform(0.26, 0.44)
    arc = np.stack([np.cos(ang), np.sin(ang)], 1)
    pts = reach * arc + rng.normal(0, 0.04 * R, (n, 2))
    pts -= 0.5 * pts.mean(0)  # keep the nucleus roughly central
    radii = R * rng.uniform(0.22, 0.3, n)
    nuc = _chain(u, v, pts, radii, 0.07 * R)
    cyto_noise = _noise(rng, size, size / 60)
    cyto = _tex([0.92, 0.81, 0.84], cyto_noise, 0.03)  # faint fine granules
    nucleus_noise = _noise(rng, size, size / 25)
    stain = _tex(NUCLEUS, nucleus_noise, 0.12)
    return cyto, [(_alpha(nuc), stain)]


def _eosinophil(rng, u, v, R, size):
    """Two lobes ("spectacles"); orange granules fill the cytoplasm."""
    sep = R * rng.uniform(0.28, 0.38)
    jitter = rng.normal(0, 0.05 * R, (2, 2))
    shift = R * rng.uniform(-0.2, 0.2)
    lobes = np.array([[-sep, 0], [sep, 0]])
    pts = lobes + jitter + [0, shift]
    radii = R * rng.uniform(0.25, 0.32, 2)
    nuc = _chain(u, v, pts, radii, 0.06 * R)
    load = rng.uniform(-0.6, 0.2)   # granule load varies, always dense
    grains = 0.9 * _granules(rng, size, size / 48, load)
    granule_noise = _noise(rng, size, size / 20)
    orange = _tex([0.95, 0.47, 0.18], granule_noise, 0.08)
    nucleus_noise = _noise(rng, size, size / 25)
    stain = _tex(NUCLEUS, nucleus_noise, 0.12)
    nucleus = _alpha(nuc)
    return [0.93, 0.70, 0.52], [(grains, orange), (nucleus, stain)]


def _basophil(rng, u, v, R, size):
    """A lobed nucleus, then dark granules on top so it is hard to see."""
    n = rng.integers(2, 4)
    pts = rng.normal(0, 0.18 * R, (n, 2))
    radii = R * rng.uniform(0.28, 0.36, n)
    nuc = _chain(u, v, pts, radii, 0.1 * R)
    dense = np.clip(1 - np.hypot(u, v) / R, 0, 1)  # granules pile up over the centre
    threshold = 1.2 - 1.4 * dense - rng.uniform(0, 0.8)
    grains = 0.95 * _granules(rng, size, size / 42, threshold)
    granule_noise = _noise(rng, size, size / 20)
    dark = _tex([0.26, 0.11, 0.36], granule_noise, 0.1)
    nucleus = _alpha(nuc)
    return [0.84, 0.76, 0.86], [(nucleus, [0.42, 0.26, 0.54]), (grains, dark)]


def _lymphocyte(rng, u, v, R, size):
    """A big round nucleus, some notched, in a thin blue rim."""
    rn = R * rng.uniform(0.68, 0.88)
    e = rng.uniform(0.88, 1.0)   # the nucleus's aspect ratio
    off = rng.normal(0, 0.05 * R, 2)
    du = u - off[0]
    dv = v - off[1]
    wobble = 0.03 * R * _noise(rng, size, size / 8)
    nuc = np.hypot(du * e, dv / e) - rn + wobble
    notch = rng.uniform(0, 0.15) * R - np.hypot(du, dv - rn)   # some are notched
    nuc = np.maximum(nuc, notch)
    nucleus_noise = _noise(rng, size, size / 22)
    stain = _tex(NUCLEUS * 0.9, nucleus_noise, 0.12)
    return [0.72, 0.74, 0.88], [(_alpha(nuc), stain)]


def _monocyte(rng, u, v, R, size):
    """A kidney-shaped nucleus (an ellipse with a bite) in grey-blue cytoplasm with vacuoles."""
    a = R * rng.uniform(0.52, 0.66)   # the ellipse's half-axes a, b
    b = R * rng.uniform(0.40, 0.50)
    cu, cv = rng.normal(0, 0.06 * R, 2)
    ru = (u - cu) / a
    rv = (v - cv) / b
    ell = (np.hypot(ru, rv) - 1) * b   # about b px times the ellipse's own distance
    bu = cu + rng.normal(0, 0.1 * a)
    bv = cv + b * rng.uniform(0.95, 1.3)  # the bite sits on one long side
    bite_r = R * rng.uniform(0.22, 0.4)
    bite = np.hypot(u - bu, v - bv) - bite_r
    vacuoles = 0.5 * _granules(rng, size, size / 16, 1.8)
    cyto_noise = _noise(rng, size, size / 30)
    cyto = _tex([0.66, 0.70, 0.80], cyto_noise, 0.03)
    nucleus_noise = _noise(rng, size, size / 18)
    stain = _tex(NUCLEUS * 1.25, nucleus_noise, 0.15)
    nucleus = _alpha(np.maximum(ell, -bite))
    return cyto, [(vacuoles, [0.92, 0.90, 0.94]), (nucleus, stain)]


DRAWERS = dict(zip(CLASSES, (_basophil, _eosinophil, _lymphocyte, _monocyte, _neutrophil)))


def _red_cells(rng, img, scale):
    """Red cells in two layers, then platelets, painted into img (S, S, 3); scale: zoomed side."""
    side = img.shape[0]
    n = rng.integers(2, 28)  # crowding varies from sparse to packed
    colour = RBC + rng.normal(0, 0.02, 3)
    pale = RBC_PALE + rng.normal(0, 0.02, 3)
    for layer in np.array_split(np.arange(n), 2):  # two layers so overlapping cells show their rims
        centres = rng.uniform(-0.1, 1.1, (2, len(layer))) * side  # some spill over the border
        radii = scale * rng.uniform(0.075, 0.095, len(layer))
        d, rel = _discs_on_grid(side, centres[0], centres[1], radii)
        pallor = 0.7 * np.clip(1 - (rel / 0.6) ** 2, 0, 1)  # pale centre of the biconcave disc
        shade = colour + (pale - colour) * pallor[..., None]
        _paint(img, _alpha(d), shade)
    _platelets(rng, img, scale)


def _platelets(rng, img, scale):
    """Small purple specks that a model must learn to ignore."""
    side = img.shape[0]
    k = rng.integers(1, 5)
    centres = rng.uniform(0, side, (2, k))
    radii = scale * rng.uniform(0.012, 0.022, k)
    d, _ = _discs_on_grid(side, centres[0], centres[1], radii)
    _paint(img, 0.8 * _alpha(d), [0.55, 0.35, 0.62])


def _cell_frame(rng, size):
    """Pixel coordinates (u, v), each (S, S), in the cell's frame: centred near the image's
    centre, turned by a random angle."""
    yy, xx = _grid(size)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    th = rng.uniform(0, 2 * np.pi)
    dx = xx - cx
    dy = yy - cy
    u = dx * np.cos(th) + dy * np.sin(th)
    v = dy * np.cos(th) - dx * np.sin(th)
    return u, v


def _cell_outline(rng, u, v, R):
    """(rho, edge), each (S, S): the pixel's stretched radius and the wavy edge's radius there;
    inside the cell where rho < edge."""
    e = rng.uniform(0.9, 1.1)   # a slightly oval cell
    phase = rng.uniform(0, 2 * np.pi, 2)
    rho = np.hypot(u / e, v * e)
    phi = np.arctan2(v, u)
    wave3 = 0.04 * np.sin(3 * phi + phase[0])   # three and five bumps around the rim
    wave5 = 0.03 * np.sin(5 * phi + phase[1])
    edge = R * (1 + wave3 + wave5)
    return rho, edge


def draw_wbc(rng, size, cls, tint):
    """One smear crop with a single white cell of class `cls`: (float RGB image (S, S, 3), bool
    cell mask (S, S))."""
    zoom = rng.uniform(0.8, 1.2)  # magnification: red and white cells scale together
    paper = BG + rng.normal(0, 0.01, 3) + tint
    img = np.full((size, size, 3), paper, np.float32)
    thickness = 1 + 0.02 * _noise(rng, size, size / 3)   # uneven smear thickness
    img *= thickness[..., None]
    _red_cells(rng, img, size * zoom)
    R = rng.uniform(*CELL_RADIUS[cls]) * size * zoom
    u, v = _cell_frame(rng, size)
    rho, edge = _cell_outline(rng, u, v, R)
    cell = _alpha(rho - edge)
    cyto, layers = DRAWERS[cls](rng, u, v, R, size)
    cyto = np.asarray(cyto, np.float32) + rng.normal(0, 0.04, 3)   # cytoplasm stain varies too
    _paint(img, cell, cyto)
    for alpha, colour in layers:
        _paint(img, alpha * cell, colour)  # clipped to the cell, so the mask is exactly the cell
    return img, rho < edge


def _tumour_region(rng, size, tumor):
    """(S, S) bool: where the tumour is; none in a normal patch."""
    if not tumor:
        return np.zeros((size, size), bool)
    field = _noise(rng, size, size / 2)
    share = rng.uniform(0.3, 1.0)   # tumour covers 30-100%
    return field >= np.quantile(field, 1 - share)


def _tumour_nuclei(rng, size):
    """(S, S) coverage of tumour nuclei: packed on a jittered grid, big, irregular."""
    step = size * rng.uniform(0.12, 0.15)
    grid = np.mgrid[0:size:step, 0:size:step].reshape(2, -1)
    shift = rng.normal(0, 0.2 * step, (2, 1))
    centres = (grid + shift).astype(np.float32)
    centres += rng.uniform(-0.3, 0.3, centres.shape) * step
    radii = step * rng.uniform(0.3, 0.42, centres.shape[1])
    d, _ = _discs_on_grid(size, centres[1], centres[0], radii)   # mgrid: row (y) first
    return _alpha(d + 0.1 * step * _noise(rng, size, size / 14))


def draw_cam(rng, size, tumor):
    """Lymph-node-like patch: small round lymphocyte nuclei; tumour = larger, darker, irregular
    ones. Returns (float RGB image (S, S, 3), bool tumour mask (S, S))."""
    stain = np.array([0.90, 0.68, 0.80]) + rng.normal(0, 0.02, 3)
    img = np.full((size, size, 3), stain, np.float32)
    fibres = 1 + 0.06 * _noise(rng, size, size / 6)   # eosin fibres, uneven staining
    img *= fibres[..., None]
    region = _tumour_region(rng, size, tumor)
    threshold = rng.uniform(0.7, 1.1)
    small = _granules(rng, size, size / 28, threshold)
    _paint(img, small * ~region, [0.36, 0.27, 0.58])
    big = _tumour_nuclei(rng, size)
    nucleus_noise = _noise(rng, size, size / 30)
    dark = _tex([0.27, 0.12, 0.38], nucleus_noise, 0.2)
    _paint(img, big * region, dark)
    return img, region


def draw_prcc(rng, size):
    """Kidney-like patch: papillae of purple-nucleated epithelium around pale lumens."""
    stain = np.array([0.86, 0.62, 0.74]) + rng.normal(0, 0.02, 3)
    img = np.full((size, size, 3), stain, np.float32)
    field = _noise(rng, size, size / rng.uniform(3, 6))
    lumens = np.clip((field - 0.7) * 3, 0, 1)
    _paint(img, lumens, [0.96, 0.93, 0.95])
    band = np.clip(1 - np.abs(field - 0.2) * 2, 0, 1)  # epithelial lining next to the lumens
    nuclei = band * _granules(rng, size, size / 20, 0.3)
    _paint(img, nuclei, [0.33, 0.20, 0.50])
    return img, None


def _hue_rotation(angle):
    """(3, 3): turns RGB colours by `angle` radians about the grey axis (Rodrigues' formula)."""
    k = np.full(3, 3 ** -0.5)
    cross = np.array([   # cross @ x == k x x
        [0, -k[2], k[1]],
        [k[2], 0, -k[0]],
        [-k[1], k[0], 0],
    ])
    keep = np.cos(angle) * np.eye(3)
    turn = np.sin(angle) * cross
    along = (1 - np.cos(angle)) * np.outer(k, k)
    return keep + turn + along


def _finish(rng, img):
    """Shared stain and scanner variation (hue, saturation, brightness, blur, noise) -> uint8
    RGB."""
    angle = rng.normal(0, 0.06)
    sat = rng.uniform(0.75, 1.2)
    hue = _hue_rotation(angle)
    grey = np.full((3, 3), 1 / 3)
    saturation = grey + sat * (np.eye(3) - grey)
    brightness = rng.uniform(0.92, 1.06)
    balance = rng.uniform(0.985, 1.015, 3)   # per channel
    gain = np.diag(brightness * balance)
    m = gain @ saturation @ hue
    colour = img @ m.T.astype(np.float32)
    rgb = np.clip(colour * 255 + 0.5, 0, 255).astype(np.uint8)
    radius = rng.uniform(0.4, 1.8) * img.shape[0] / 128
    blurred = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius))
    out = np.asarray(blurred, np.float32)
    sensor = rng.normal(0, rng.uniform(1, 7), out.shape)   # the camera's own noise
    return np.clip(out + sensor + 0.5, 0, 255).astype(np.uint8)


def _tmp(path):
    """A hidden temporary name beside path, one per process."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def _save(path, arr, fmt, **kw):
    tmp = _tmp(path)
    Image.fromarray(arr).save(tmp, fmt, **kw)
    os.replace(tmp, path)  # atomic: readers never see a half-written file


def _link(src, dst):
    tmp = _tmp(dst)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (other filesystem, existing temp): copy instead
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _pick_tint(rng, split, cls, confound):
    """The background tint (3,): the class's own with probability `confound` on train, else a
    random class's."""
    agree = rng.random()
    random_tint = rng.integers(len(CLASSES))  # both drawn: the same cell at any confound
    confounded = split == "train" and agree < confound
    t = CLASSES.index(cls) if confounded else random_tint
    return TINTS[t]


def _make(job):
    """Draw and write one image (and its mask); a job is a plain tuple so it pickles to workers."""
    kind, split, cls, idx, seed, size, confound, img_path, mask_path = job
    rng = _rng(seed, kind + "/" + split, cls, idx)
    if kind == "wbc":
        tint = _pick_tint(rng, split, cls, confound)
        img, mask = draw_wbc(rng, size, cls, tint)
    elif kind == "cam":
        img, mask = draw_cam(rng, size, cls == "tumor")
    else:
        img, mask = draw_prcc(rng, size)
    _save(img_path, _finish(rng, img), "JPEG", quality=92)
    if mask_path:
        _save(mask_path, mask.astype(np.uint8) * 255, "PNG")


def _count(summary, key, cls, masked):
    """Count one image (and its mask) under summary[key]."""
    entry = summary.setdefault(key, {"images": 0, "masks": 0, "classes": {}})
    entry["images"] += 1
    entry["masks"] += bool(masked)
    if cls:
        entry["classes"][cls] = entry["classes"].get(cls, 0) + 1


def _check_values(scale, size, seed, confound):
    """A ValueError naming the first value that cannot make a dataset."""
    if not 0 < scale < float("inf"):   # also refuses nan
        raise ValueError(f"need 0 < scale < inf, got {scale}")
    if size < 32:
        raise ValueError(f"need size >= 32, got {size}")
    if not 0 <= confound <= 1:
        raise ValueError(f"need 0 <= confound <= 1, got {confound}")
    if seed < 0:
        raise ValueError(f"need seed >= 0, got {seed}")


def _plan_wbc(add, seed, scale):
    """Queue WBC_100's train and val images; returns {class: (n_train, indices with a mask)}."""
    wbc_train = {}
    for cls in CLASSES:
        full_train, full_masks, full_val = WBC_COUNTS[cls]
        n_train = max(2, round(full_train * scale))
        n_val = max(1, round(full_val * scale))
        n_mask = min(n_train, max(1, round(full_masks * scale)))
        picked = _rng(seed, "masks", cls).choice(n_train, n_mask, replace=False)
        masked = set(picked.tolist())
        wbc_train[cls] = (n_train, masked)
        for i in range(n_train):
            add("wbc", "train", cls, i, "WBC_100/train", f"{cls}_{i:06d}", i in masked)
        for i in range(n_train, n_train + n_val):  # val stems continue the numbering: all unique
            add("wbc", "val", cls, i, "WBC_100/val", f"{cls}_{i:06d}", True)
    return wbc_train


def _plan_cam(add, seed, scale):
    """Queue CAM16's images, the classes alternating; masks on ~10% of train, either class."""
    for split, full in CAM_COUNTS.items():
        n = max(2, round(full * scale))
        n_masks = 0
        if split == "train":
            n_masks = max(1, round(CAM_MASKS * scale))
        order = _rng(seed, "cam-masks").permutation(n)
        masked = set(order[:n_masks].tolist())
        for i in range(n):
            cls = "tumor" if i % 2 else "normal"
            add("cam", split, cls, i, f"CAM16/{split}", f"{split}_{cls}_{i:06d}", i in masked)


def _draw_all(jobs, workers):
    """Run every job, in `workers` processes (default: all CPUs); the files are the same."""
    if not workers:
        workers = os.cpu_count() or 1
    if workers <= 1:
        for job in jobs:
            _make(job)
        return
    with Pool(workers) as pool:
        list(pool.imap_unordered(_make, jobs, chunksize=16))   # list(): wait, and raise any error


def _link_subset(root, subset, cls, i, masked):
    """Hard-link WBC_100's training image i of `cls` (and its mask) into `subset`."""
    kinds = [("data", "jpg")]
    if masked:
        kinds.append(("mask", "png"))
    for sub, ext in kinds:
        name = f"{cls}_{i:06d}.{ext}"
        src = os.path.join(root, "WBC_100", "train", sub, cls, name)
        dst = os.path.join(root, subset, "train", sub, cls, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _link(src, dst)


def _write_subsets(root, seed, wbc_train, summary):
    """WBC_50, WBC_10, WBC_1: per class, prefixes of one permutation, so each nests in the last."""
    for cls, (n_train, masked) in wbc_train.items():
        order = _rng(seed, "subset", cls).permutation(n_train)
        for name, frac in SUBSETS:
            n = max(1, round(n_train * frac))
            for i in order[:n].tolist():
                _link_subset(root, name, cls, i, i in masked)
                _count(summary, f"{name}/train", cls, i in masked)


def write_synth(root, scale=0.1, size=128, seed=0, confound=0.0, workers=None):
    """Write the synthetic datasets under root; returns {split: {"images", "masks", "classes"}}."""
    _check_values(scale, size, seed, confound)
    jobs = []
    summary = {}

    def add(kind, split, cls, idx, folder, stem, masked):
        """Queue one image (and its mask when `masked`) and count it under `folder`."""
        sub = ("data", cls) if cls else ()   # pRCC has no classes: its images at the top
        img_path = os.path.join(root, folder, *sub, stem + ".jpg")
        mask_path = None
        if masked:
            mask_path = os.path.join(root, folder, "mask", cls, stem + ".png")
        jobs.append((kind, split, cls, idx, seed, size, float(confound), img_path, mask_path))
        _count(summary, folder, cls, masked)

    wbc_train = _plan_wbc(add, seed, scale)
    _plan_cam(add, seed, scale)
    for i in range(max(1, round(PRCC_COUNT * scale))):
        add("prcc", "all", "", i, "pRCC", f"pRCC_{i:06d}", False)
    paths = [path for job in jobs for path in job[7:] if path]
    for folder in {os.path.dirname(path) for path in paths}:   # all first: a bad ROOT fails at once
        os.makedirs(folder, exist_ok=True)
    _draw_all(jobs, workers)
    _write_subsets(root, seed, wbc_train, summary)
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="synth.py", usage=USAGE, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT",
                   help="folder to write: new or empty (made if missing)")
    p.add_argument("--scale", metavar="S", type=float, default=0.1,
                   help="fraction of the real dataset sizes, finite and > 0 (1 = full size; "
                        "default 0.1)")
    p.add_argument("--size", metavar="PX", type=int, default=128,
                   help="image side in pixels, >= 32 (default 128)")
    p.add_argument("--seed", metavar="K", type=int, default=0,
                   help="random seed, >= 0; fixes every byte (default 0)")
    p.add_argument("--confound", metavar="P", type=float, default=0.0,
                   help="probability in [0, 1] that a TRAIN image's background tint names its "
                        "class (default 0)")
    p.add_argument("--workers", metavar="N", type=int,
                   help="processes (default: all CPUs); the output is the same")
    p.add_argument("--force", action="store_true",
                   help="write into a ROOT that is not empty: replaces its WBC_*, CAM16, pRCC")
    args = p.parse_args(argv)
    if not 0 < args.scale < float("inf"):   # also refuses nan
        p.error(f"argument --scale: must be finite and > 0, got {args.scale}")
    if args.size < 32:
        p.error(f"argument --size: must be >= 32, got {args.size}")
    if args.seed < 0:
        p.error(f"argument --seed: must be >= 0, got {args.seed}")
    if not 0 <= args.confound <= 1:
        p.error(f"argument --confound: must be in [0, 1], got {args.confound}")
    if args.workers is not None and args.workers < 1:
        p.error(f"argument --workers: must be >= 1, got {args.workers}")
    return args


def check_root(root, force):
    """Exit with one line unless ROOT is a new or empty folder (or --force)."""
    if not root:
        sys.exit("error: ROOT must name a folder; '' is empty")
    if os.path.exists(root) and not os.path.isdir(root):
        sys.exit(f"error: ROOT must name a folder; {root!r} is an existing file")
    if os.path.isdir(root) and os.listdir(root) and not force:   # else two seeds mix on disk
        sys.exit(f"error: ROOT {root} is not empty; use a new folder, or --force to replace it")


def main(argv=None):
    args = parse_args(argv)
    check_root(args.root, args.force)
    if args.force:
        for name in OWN_FOLDERS:
            shutil.rmtree(os.path.join(args.root, name), ignore_errors=True)
    start = time.time()
    try:  # write_synth makes every folder before it draws, so an unwritable ROOT fails at once
        summary = write_synth(args.root, args.scale, args.size, args.seed, args.confound,
                              args.workers)
    except OSError as e:
        where = e.filename or args.root
        sys.exit(f"error: cannot write {where}: {e.strerror or e}")
    for split, entry in summary.items():
        classes = " ".join(f"{c}={n}" for c, n in entry["classes"].items())
        print(f"{split:14s} {entry['images']:6d} images {entry['masks']:5d} masks  {classes}")
    print(f"wrote synthetic data to {args.root} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
