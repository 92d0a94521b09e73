"""sweep.py's report of whatever has finished under OUT: each classifier's shortcut audit
(audit.json), paired statistics, tables (OUT/results.md, .json), figures (OUT/figures/, needs
matplotlib), the grid's missing runs.

    python sweep_report.py results/demo [--device cpu] [--no-figures]   # sweep.py --report-only's
"""
import argparse
import functools
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (DataError, atomic_write, guide_for, infer, load_checkpoint, load_set, save_json,
                  wbc_dirs, white_balance)
from losses import cohen_kappa
from resnet_cls import ResNetClassifier

# every mask setting vs both; alpha0_1: the same per-location loss, uniform weights
CONTROLS = ("nomask", "alpha0_1")
# the primary test, fixed before the guidance runs: each of these modes minus nomask in val
# accuracy, paired by seed, Holm-corrected over the modes the sweep ran; all else is exploratory
PRIMARY = ("input", "crop", "nomask_rrr")
CACHE = ".cache/decoded"   # the trainers' default decode cache: the audit shares it
AUDIT_VERSION = 6          # bump when audit_run changes, so older audit.json files are redone

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the sweep's folder (sweep.py --out)")
    p.add_argument("--grid", type=json.loads, default={},
                   help="JSON over OUT/sweep.json's keys (runs, settings ...)")
    p.add_argument("--device", default="auto",
                   help="of the audit and figures: auto (CUDA if present), cpu, cuda:1 ...")
    p.add_argument("--no-figures", action="store_true",
                   help="skip the figures (they need matplotlib)")
    return p.parse_args(argv)

def pick_device(name):
    """auto: CUDA if present, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")

def read_sweep_json(path):
    """(the grid a sweep saved, None) or ({}, why not): missing, not JSON, or not a sweep's."""
    if not Path(path).is_file():
        return {}, f"{path} not found; point --out at a sweep's folder (or run the sweep first)"
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return {}, f"{path} is unreadable ({type(e).__name__}); rerun the sweep to write it again"
    if not isinstance(saved, dict) or not isinstance(saved.get("splits"), list):
        return {}, f"{path} is not a sweep's record (no 'splits' list); point --out at a sweep"
    return saved, None

def read_json(path):
    """A JSON file's content, {} if it is absent; one that is not JSON: a DataError naming it."""
    if not Path(path).is_file():
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({type(e).__name__}); fix it, or remove its run's "
                        f"folder and rerun the sweep") from None

def quiet(*_):
    """load_set's log, silenced: the report prints its own."""

@functools.lru_cache(maxsize=8)   # the runs on one masker's masks share a val set: load it once
def load_val(root, split, size, classes, generated):
    """WBC_100/val: images, labels, generated masks or None, masks to blank with (truth if
    complete), their name."""
    dirs = wbc_dirs(root, split)
    names = list(classes)
    gen = load_set(dirs["val_data"], size, names, [Path(generated) / "val"], CACHE, log=quiet)
    truth = load_set(dirs["val_data"], size, names, [dirs["val_mask"]], CACHE, log=quiet)
    gen_masks = gen.masks if gen.has_mask.all() else None
    if truth.has_mask.all():
        return truth.images, truth.labels, gen_masks, truth.masks, "ground truth (WBC_100/val/mask)"
    if gen_masks is None:
        raise DataError(f"{generated}/val: no mask for every val image, and no complete "
                        f"WBC_100/val/mask")
    return gen.images, gen.labels, gen_masks, gen_masks, f"generated ({generated}/val)"

def blank(images, masks, keep):
    """(N, 3, H, W) uint8 images with only the cell (keep='cell') or the background left.
    Cell-only: the outside gets ONE colour shared by all images (its own would carry a class
    tint). Background-only: the cell, grown, gets the mean background."""
    if keep not in ("cell", "background"):
        raise ValueError(f"keep={keep!r}: 'cell' or 'background'")
    mask = masks.float()   # (N, 1, H, W)
    x = images.float()
    # odd, so the pool is centred: the cell grows by side/32 px (at least 1) each way
    grow = 2 * max(1, images.shape[-1] // 32) + 1
    outside = 1 - F.max_pool2d(mask, grow, stride=1, padding=grow // 2)
    if keep == "cell":
        outside_sum = (x * outside).sum((0, 2, 3), keepdim=True)   # (1, 3, 1, 1)
        shared = outside_sum / outside.sum().clamp_min(1)
        out = x * mask + shared * (1 - mask)
    else:
        area = outside.sum((2, 3), keepdim=True)
        background_sum = (x * outside).sum((2, 3), keepdim=True)   # (N, 3, 1, 1)
        mean_background = background_sum / area.clamp_min(1)
        own = torch.where(area > 0, mean_background, 128.0)   # no background left: mid-grey
        out = x * outside + own * (1 - outside)
    return out.round().clamp(0, 255).to(torch.uint8)

def positive_cam(maps, classes, size):
    """(N, H, W): each (C, h, w) logit map's channel of its class in `classes`, positive part,
    upsampled to `size` (H, W)."""
    cam = maps[torch.arange(len(maps)), classes].clamp_min(0)[:, None]   # (N, 1, h, w)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]

def cam_inside(maps, classes, masks):
    """(N,): the share of the positive map of `classes`, upsampled to the masks' size, inside
    the mask (NaN: none)."""
    up = positive_cam(maps, classes, masks.shape[-2:])
    total = up.sum((1, 2))
    inside = (up * masks[:, 0].float()).sum((1, 2))
    return torch.where(total > 0, inside / total.clamp_min(1e-12), float("nan"))

def load_run(folder, device):
    """(model giving logit maps, checkpoint, its --mask-mode, load_val's 5-tuple) of a finished
    classifier run."""
    ckpt = load_checkpoint(Path(folder) / "checkpoint.pt", ("classes",))
    run = ckpt["args"]   # read only keys every version has
    mode = run.get("mask_mode", "loss")
    channel = mode == "channel"
    model = ResNetClassifier(len(ckpt["classes"]), 4 if channel else 3)
    model.load_state_dict(ckpt["model"])
    model.forward = model.forward_map
    classes = tuple(ckpt["classes"])   # a tuple: load_val's cache key
    val = load_val(str(run["data"]), run["split"], run["size"], classes, str(run["masks"]))
    if mode != "loss" and val[2] is None:
        raise DataError(f"{folder}: a --mask-mode {mode} model, and {run['masks']}/val lacks "
                        f"masks of val images")
    return model.to(device, memory_format=torch.channels_last), ckpt, mode, val

def pick_amp(device):
    """The --amp auto rule: bf16 where `device` computes it natively, fp16 on older GPUs, else
    off."""
    if device.type == "cuda":   # not is_bf16_supported(): True on a T4, which emulates bf16 slowly
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        return "bf16" if native_bf16 else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "off"

def logit_maps(model, images, masks, mode, device):
    """(N, C, h, w) float on the CPU, the images seen as --mask-mode `mode` sees them; autocast
    by the trainers' rule for `device`."""
    amp = pick_amp(device)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16   # inference: fp16 needs no scaler
    autocast = torch.autocast(device.type, dtype, enabled=amp != "off")
    guide = guide_for(mode, images.shape[-1])
    channel = mode == "channel"
    return infer(model, images, masks, 64, device, autocast, channel, guide=guide)

def predictions(model, view, mode, device):
    """(N,) classes of one view (images, their masks): the argmax of the mean logit."""
    return logit_maps(model, *view, mode, device).mean((2, 3)).argmax(1)

def balanced(images, chunk=64):
    """uint8 images as the classifier sees them under --white-balance (data.white_balance)."""
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):   # float copies of all of val are big
        x = images[start:start + chunk].float() / 255
        out[start:start + chunk] = (white_balance(x) * 255).round().to(torch.uint8)
    return out

def blanked_views(images, masks, gen_masks, white, hides=False):
    """{'full', 'cell', 'background': (uint8 images, their masks or None)}, as the classifier
    sees them: white-balanced first (then blanked), and no cell in the background-only view's
    4th channel. hides (--mask-mode input, crop): the background-only view keeps the cell's mask,
    so the model sees only the painted-over cell: near chance, if the mask hides the rest."""
    seen = balanced(images) if white else images
    background_masks = gen_masks   # input, crop: where the cell was, now painted over
    if gen_masks is not None and not hides:   # a channel model: no cell in its 4th channel
        background_masks = torch.zeros_like(gen_masks)
    return {
        "full": (seen, gen_masks),
        "cell": (blank(seen, masks, "cell"), gen_masks),
        "background": (blank(seen, masks, "background"), background_masks),
    }

def agreement(a, b):
    """The share of places where two label tensors agree, a float."""
    return (a == b).float().mean().item()

def audit_run(folder, device):
    """audit.json: accuracy on full, cell-only and background-only val images, agreement, CAM
    share in the mask."""
    model, ckpt, mode, (images, labels, gen_masks, masks, source) = load_run(folder, device)
    white = bool(ckpt["args"].get("white_balance"))
    views = blanked_views(images, masks, gen_masks, white, mode in ("input", "crop"))
    maps = logit_maps(model, *views["full"], mode, device)
    preds = maps.mean((2, 3)).argmax(1)
    cell = predictions(model, views["cell"], mode, device)
    back = predictions(model, views["background"], mode, device)
    n_classes = len(ckpt["classes"])
    record = {
        "version": AUDIT_VERSION,
        "accuracy": agreement(preds, labels),
        "cell_only_accuracy": agreement(cell, labels),
        "background_only_accuracy": agreement(back, labels),
        "cell_only_agreement": agreement(cell, preds),
        "background_only_agreement": agreement(back, preds),
        # kappa: agreement beyond what the two predictions' class shares give by chance
        "cell_only_kappa": cohen_kappa(cell, preds, n_classes),
        "background_only_kappa": cohen_kappa(back, preds, n_classes),
        "background_only_predicted": torch.bincount(back, minlength=n_classes).tolist(),
        "background_only_top_share": torch.bincount(back).max().item() / len(back),
        "mask_area": masks.float().mean().item(),
        "cam_inside_mask": cam_inside(maps, preds, masks).nanmean().item(),
        "logit_map": list(maps.shape[-2:]),
        "classes_predicted": len(set(preds.tolist())),
        "blank_masks": source,
        "n": len(labels),
    }
    save_json(record, Path(folder) / "audit.json")
    return record

def audit_is_current(folder):
    """True if folder/audit.json is of AUDIT_VERSION and newer than the checkpoint."""
    audit = folder / "audit.json"
    try:
        version = read_json(audit).get("version")
    except DataError:   # a damaged audit.json is redone
        return False
    if version != AUDIT_VERSION:
        return False
    return audit.stat().st_mtime >= (folder / "checkpoint.pt").stat().st_mtime

def audit_all(out, device):
    """Audit the finished classifier runs under OUT without a current audit.json; failures
    listed."""
    failures = []
    for folder in sorted(p.parent for p in Path(out).glob("classifier/WBC_*/*/seed*/metrics.json")):
        if audit_is_current(folder):
            continue
        try:
            audit_run(folder, device)
        except (Exception, SystemExit) as e:   # SystemExit: load_checkpoint's clear errors
            failures.append((str(folder), f"audit failed: {type(e).__name__}: {e}"))
    return failures

def is_missing(x):
    return x is None or (isinstance(x, float) and math.isnan(x))

def mean_std(values):
    """(mean, sample std (NaN below 2 values), n) of the values that are not None or NaN."""
    kept = [x for x in values if not is_missing(x)]
    n = len(kept)
    mean = sum(kept) / n if n else float("nan")
    std = float("nan")
    if n > 1:
        std = math.sqrt(sum((x - mean) ** 2 for x in kept) / (n - 1))
    return mean, std, n

def t_cdf(t, df):
    """P(T <= t) of Student's t, integer df >= 1, exact: the finite series of Abramowitz &
    Stegun 26.7.3-4."""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    term = 1.0
    total = float(df > 1)   # df 1 (Cauchy): theta alone
    for k in range(1 + df % 2, df - 1, 2):   # odd df: k = 2, 4 .. df-3; even df: k = 1, 3 .. df-3
        term *= cos2 * k / (k + 1)
        total += term
    if df % 2:
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:
        inside = math.sin(theta) * total
    return 0.5 + math.copysign(inside / 2, t)

def sign_flip_p(diffs):
    """Exact two-sided p: the share of the 2^n sign flips of the differences with |sum| >= the
    observed (>= 2/2^n)."""
    if not diffs:
        return float("nan")
    # float sums of a tie differ in the last bits: count those as reaching the observed
    tolerance = 1e-9 * max(1.0, sum(map(abs, diffs)))
    observed = abs(sum(diffs)) - tolerance
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    sums = [abs(sum(s * d for s, d in zip(signs, diffs))) for signs in flips]
    return sum(s >= observed for s in sums) / len(flips)

def paired_t_p(mean, std, n):
    """Two-sided p of the paired t-test; NaN below 2 seeds. Zero variance: 1 if every
    difference is 0, else NaN (t = mean / 0 is undefined; p = 0 would claim a certainty a few
    seeds never give)."""
    if n < 2:
        return float("nan")
    if std == 0:
        return 1.0 if mean == 0 else float("nan")
    return 2 * t_cdf(-abs(mean) * n ** 0.5 / std, n - 1)

def paired(a, b):
    """{seed: value} a - b over common seeds: mean, std, n, paired t-test p (NaN below 2 seeds)
    and sign_flip_p."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    mean, std, n = mean_std(diffs)
    p_t = paired_t_p(mean, std, n)
    return {"mean": mean, "std": std, "n": n, "p_t": p_t, "p_perm": sign_flip_p(diffs)}

def holm(p_values):
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest p times (m - k),
    never below the one before it, at most 1. A NaN p (undefined) counts as 1."""
    ps = [1.0 if math.isnan(p) else p for p in p_values]
    order = sorted(range(len(ps)), key=ps.__getitem__)
    adjusted = [1.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted

def primary_tests(stats):
    """The PRIMARY modes' val accuracy minus nomask's (comparisons() rows), each with its Holm
    p over the modes present."""
    rows = [r for r in stats if r["metric"] == "accuracy" and r["control"] == "nomask"]
    rows = [r for r in rows if r["setting"].startswith(PRIMARY) and "_balance" not in r["setting"]]
    adjusted = holm([r["p_t"] for r in rows])
    return [r | {"p_holm": p} for r, p in zip(rows, adjusted)]

def by_seed(runs, key):
    """{seed: value(run, key)} of the runs that have it."""
    values = {}
    for r in runs:
        v = value(r, key)
        if v is not None:
            values[r["seed"]] = v
    return values

def comparisons(classifiers, key):
    """Each mask setting minus each CONTROLS setting of its split and balance, paired by seed,
    on value(run, key)."""
    rows = []
    per = group(classifiers, "split", "setting")
    for (split, setting), these in per.items():
        suffix = "_balance" if setting.endswith("_balance") else ""
        for control in (c + suffix for c in CONTROLS):
            if setting in ("nomask" + suffix, control):   # nomask is only a control; no self-pair
                continue
            if (split, control) not in per:
                continue
            stats = paired(by_seed(these, key), by_seed(per[split, control], key))
            names = {"metric": key, "split": split, "setting": setting, "control": control}
            rows.append(names | stats)
    return rows

def masker_row(path):
    """A masker's metrics.json with its seed and folder (OUT/masker/WBC_<split>_<loss>_seed<k>)."""
    folder = path.parent
    seed = int(folder.name.rsplit("seed", 1)[1])
    return read_json(path) | {"seed": seed, "folder": str(folder)}

def classifier_row(path):
    """A classifier's metrics.json with its place in the grid, audit.json and leakage.json."""
    folder = path.parent   # OUT/classifier/WBC_<split>/<setting>/seed<k>
    metrics = read_json(path)
    found = {
        "seed": int(folder.name[4:]),
        "setting": folder.parent.name,
        "folder": str(folder),
        "split": int(folder.parents[1].name[4:]),
        "audit": read_json(folder / "audit.json"),
        "leakage": read_json(folder / "leakage.json"),
    }
    return metrics | found

def collect(out, settings):
    """Every finished run under OUT, each once: (masker rows, classifier rows), plain dicts, in
    table order."""
    maskers = [masker_row(p) for p in Path(out).glob("masker/WBC_*_seed*/metrics.json")]
    maskers.sort(key=lambda r: (-r["split"], r["loss"], r["seed"]))
    runs = [classifier_row(p) for p in Path(out).glob("classifier/WBC_*/*/seed*/metrics.json")]
    order = {s: i for i, s in enumerate(settings)}   # the grid's, then the rest by name
    runs.sort(key=lambda r: (-r["split"], order.get(r["setting"], 99), r["setting"], r["seed"]))
    return maskers, runs

def group(rows, *keys):
    """{tuple(row[k] for k in keys): [rows]} in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out

def value(run, key):
    """A run's number: `key` of metrics.json, else of audit.json; or a path like ("held_out",
    "iou"). None if absent."""
    if isinstance(key, str):
        if key in run:
            return run[key]
        return run.get("audit", {}).get(key)
    node = run
    for k in key:
        node = node.get(k) if isinstance(node, dict) else None
    return node

def fmt(values, scale=100.0, digits=1):
    """'81.2 ± 2.3' (mean ± sample std), '81.2' for one value, '-' for none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    if n > 1:
        text += f" ± {std * scale:.{digits}f}"
    return text

def md_table(header, rows):
    """A markdown table: the header, its --- line, one line per row."""
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in lines)

def mean_table(runs, by, columns):
    """One row per split and runs[by]; each column (name, value() key, scale, digits) as mean ±
    std over seeds."""
    rows = []
    for (split, name), these in group(runs, "split", by).items():
        cells = [fmt([value(r, k) for r in these], s, d) for _, k, s, d in columns]
        rows.append([f"WBC_{split}", name] + cells + [len(these)])
    header = ["split", by] + [c[0] for c in columns] + ["seeds"]
    return md_table(header, rows)

# (column name, value() key, scale, digits)
MASKER_COLUMNS = (
    ("train pixel error %", ("train", "pixel_error"), 100, 1),
    ("train Dice", ("train", "dice"), 1, 3),
    ("held-out pixel error %", ("held_out", "pixel_error"), 100, 1),
    ("held-out IoU", ("held_out", "iou"), 1, 3),
    ("held-out Dice", ("held_out", "dice"), 1, 3),
)
CLASSIFIER_COLUMNS = (
    ("val accuracy %", "accuracy", 100, 1),
    ("balanced accuracy %", "balanced_accuracy", 100, 1),
    ("macro F1", "macro_f1", 1, 3),
)
BALANCE_COLUMNS = [   # after one error column per class
    ("weighted mean error %", "weighted_mean_error", 100, 1),
    ("std over classes", "per_class_error_std", 100, 1),
]
AUDIT_COLUMNS = (
    ("val acc %", "accuracy", 100, 1),
    ("cell-only acc %", "cell_only_accuracy", 100, 1),
    ("background-only acc %", "background_only_accuracy", 100, 1),
    ("cell-only keeps pred %", "cell_only_agreement", 100, 1),
    ("background-only keeps pred %", "background_only_agreement", 100, 1),
    ("cell-only kappa", "cell_only_kappa", 1, 2),
    ("background-only kappa", "background_only_kappa", 1, 2),
    # the raw 'keeps pred' of a model that falls back on one class is about this share
    ("background-only top class %", "background_only_top_share", 100, 1),
    ("CAM share in mask %", "cam_inside_mask", 100, 1),
    ("mask area %", "mask_area", 100, 1),
    # 1: a model that predicts one class keeps any prediction: its 'keeps pred' say nothing
    ("classes predicted", "classes_predicted", 1, 1),
)
PAIRED_METRICS = (
    ("accuracy", "Val accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("cell_only_agreement", "Cell-only images keep the prediction (audit)"),
    ("background_only_agreement", "Background-only images keep the prediction (audit)"),
    ("background_only_kappa", "Background-only images keep the prediction, Cohen's kappa (audit)"),
    ("cam_inside_mask", "Class-activation share inside the mask (audit)"),
)
PAIRED_HEADER = ["split", "difference", "seeds", "mean diff (points)", "std of diffs",
                 "p (paired t)", "p (sign-flip, exact)"]
PAIRED_NOTE = (
    "Each setting minus `nomask` and minus `alpha0_1` (same per-location loss, uniform weights), "
    "same seed and balance, in points. p (paired t): two-sided, df = n - 1, assumes normal "
    "differences. p (sign-flip): exact, two-sided, over all 2^n sign flips; at least 2/2^n "
    "(0.25 at n = 3). A p (paired t) of '-' with a std of 0.0: every seed gave the same non-zero "
    "difference, t is undefined; read the sign-flip p.")

def p_text(x):
    return "-" if math.isnan(x) else f"{x:.3f}"

def paired_row(r):
    """A comparisons() row as a line of its table."""
    std = "-" if math.isnan(r["std"]) else f"{100 * r['std']:.1f}"
    difference = f"{r['setting']} - {r['control']}"
    mean = f"{100 * r['mean']:+.1f}"
    p_t = p_text(r["p_t"])
    p_perm = p_text(r["p_perm"])
    return [f"WBC_{r['split']}", difference, r["n"], mean, std, p_t, p_perm]

PRIMARY_HEADER = ["split", "difference", "seeds", "mean diff (points)", "std of diffs",
                  "p (paired t)", "p (Holm)"]

def primary_table(primary):
    """primary_tests() rows as a table: paired_row's columns with the Holm p for the last."""
    rows = [paired_row(r)[:-1] + [p_text(r["p_holm"])] for r in primary]
    return md_table(PRIMARY_HEADER, rows)

def paired_tables(stats):
    """One table per metric of PAIRED_METRICS from comparisons() rows."""
    tables = []
    for key, words in PAIRED_METRICS:
        rows = [paired_row(r) for r in stats if r["metric"] == key]
        tables.append(f"{words}:\n\n" + md_table(PAIRED_HEADER, rows))
    return "\n\n".join(tables)

def setup_lines(out, cfg, maskers, classifiers, missing):
    """results.md's head: data, init, sizes and epochs, what finished, what is missing, leaks."""
    synth = f" (synthetic {cfg['synth']})" if cfg.get("synth") else ""
    baselines = sorted({f"{100 * r['majority_baseline']:.1f}%" for r in classifiers})
    missing_list = "".join(f"\n  - {m}" for m in missing)
    checked = sum(bool(r["leakage"]) for r in classifiers)
    leaks = [r["folder"] for r in classifiers if r["leakage"] and not r["leakage"].get("ok")]
    leak_list = ": " + ", ".join(leaks) if leaks else ""
    return [
        f"# Sweep results: {out}",
        "",
        f"- data {cfg.get('data')}{synth}; init {cfg.get('init')}",
        f"- {cfg.get('size')} px; WBC_100 epochs (more for smaller splits): classifier "
        f"{cfg.get('epochs')}, masker {cfg.get('masker_epochs')} + {cfg.get('pretrain_epochs')} "
        f"on CAM16; masks of masker seed {cfg.get('masker_seeds', '?')[0]}",
        f"- finished: {len(maskers)} masker, {len(classifiers)} classifier runs; majority baseline "
        f"on val " + ", ".join(baselines),
        f"- missing from the grid: {len(missing)}" + missing_list,
        f"- leakage guard: {checked} of {len(classifiers)} classifier runs checked, {len(leaks)} "
        f"failed" + leak_list,
    ]

def audit_note(audited):
    """What the audit table's columns mean, with the masks and logit map size it used."""
    return (f"Blanked with the {audited.get('blank_masks')} masks: cell-only = outside painted one "
            "shared colour, background-only = the cell (grown a few px) painted the image's mean "
            "background; 'keeps pred': as on the full image, raw and as Cohen's kappa (0: chance, "
            "given each view's class shares). CAM share: of the predicted class's "
            f"positive {audited.get('logit_map')} logit map, upsampled, inside the mask (a uniform "
            "map scores the mask area).")

def result_lines(maskers, classifiers, stats, primary):
    """results.md's tables, each under its heading (primary: primary_tests' rows)."""
    support = (classifiers or [{}])[0].get("support", {})   # the classes, as the first run has them
    per_class = [(f"{c} (n={n}) error %", ("per_class_error", c), 100, 1)
                 for c, n in support.items()]
    audited = next((r["audit"] for r in classifiers if r["audit"]), {})
    return [
        "## Masker (stage 1), held out = WBC_100/val/mask", "",
        mean_table(maskers, "loss", MASKER_COLUMNS), "",
        "## Classifier (stage 2) on WBC_100/val, mean ± sample std over seeds", "",
        mean_table(classifiers, "setting", CLASSIFIER_COLUMNS), "",
        "## Primary test: each guidance mode minus nomask, val accuracy", "",
        f"Fixed before the runs: the modes {', '.join(PRIMARY)} (those the sweep ran) minus "
        "`nomask`, paired by seed, paired t, Holm-corrected over those modes. Every other "
        "comparison below is exploratory (uncorrected).", "",
        primary_table(primary), "",
        "## Mask settings vs the controls, paired by seed (exploratory)", "",
        PAIRED_NOTE, "",
        paired_tables(stats), "",
        "## Class balance: per-class error, each setting next to its --balance twin", "",
        mean_table(classifiers, "setting", per_class + BALANCE_COLUMNS), "",
        "## Shortcut audit", "",
        audit_note(audited), "",
        mean_table(classifiers, "setting", AUDIT_COLUMNS), "",
    ]

def report(out, cfg, maskers, classifiers, missing, figures):
    """results.md (set-up, missing runs, every table) and results.json; returns the markdown."""
    stats = [row for key, _ in PAIRED_METRICS for row in comparisons(classifiers, key)]
    primary = primary_tests(stats)
    lines = setup_lines(out, cfg, maskers, classifiers, missing) + [""]
    lines += result_lines(maskers, classifiers, stats, primary)
    if figures:
        lines += ["## Figures", ""]
        lines += [f"- [{Path(f).name}]({Path(f).relative_to(out)})" for f in figures]
        lines += [""]
    text = "\n".join(lines)
    atomic_write(out / "results.md", lambda f: f.write(text.encode()))
    record = {
        "config": cfg,
        "missing": missing,
        "figures": list(map(str, figures)),
        "maskers": maskers,
        "stats": {"paired": stats, "primary": primary},
        "classifiers": classifiers,
    }
    save_json(record, out / "results.json")
    return text

def save_figure(plt, fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)

def plot_confusion(plt, runs, path, title):
    """Confusion matrix summed over seeds, colours row-normalised (recall), counts written in."""
    classes = [c[:4] for c in runs[0]["support"]]
    conf = torch.tensor([r["confusion"] for r in runs]).sum(0).float()   # (C, C): true x predicted
    recall = conf / conf.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(recall.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i, j in itertools.product(range(len(classes)), repeat=2):
        ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=8)
    ticks = range(len(classes))
    ax.set(xticks=ticks, xticklabels=classes, yticks=ticks, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    return save_figure(plt, fig, path)

def plot_accuracy_vs_split(plt, classifiers, path):
    """Val accuracy against the training fraction, one line per setting, error bars = std over
    seeds."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (setting,), runs in group(classifiers, "setting").items():
        points = []
        for (split,), these in group(runs, "split").items():
            mean, std, _ = mean_std([r["accuracy"] for r in these])
            points.append((split, mean, std))
        points.sort()
        fractions = [p[0] for p in points]
        accuracies = [100 * p[1] for p in points]
        errors = [0 if math.isnan(p[2]) else 100 * p[2] for p in points]   # one seed: no bar
        ax.errorbar(fractions, accuracies, yerr=errors, marker="o", capsize=3, label=setting)
    ax.axhline(100 * classifiers[0]["majority_baseline"], color="grey", linestyle="--",
               label="majority")
    splits = sorted({r["split"] for r in classifiers})
    ax.set(xscale="log", xticks=splits, xticklabels=map(str, splits),
           xlabel="training data (% of WBC_100)", ylabel="val accuracy %")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)

def plot_examples(plt, folder, path, device, per_class=2):
    """A few val cells of each class under one run's true-class activation (positive logit map,
    upsampled)."""
    model, ckpt, mode, (images, labels, gen_masks, masks, _) = load_run(folder, device)
    classes = [c[:4] for c in ckpt["classes"]]
    pick = torch.cat([(labels == c).nonzero()[:per_class, 0] for c in range(len(classes))])
    seen = balanced(images[pick]) if ckpt["args"].get("white_balance") else images[pick]
    fourth = None if gen_masks is None else gen_masks[pick]
    maps = logit_maps(model, seen, fourth, mode, device)
    up = positive_cam(maps, labels[pick], images.shape[-2:])
    fig, axes = plt.subplots(1, len(pick), figsize=(1.4 * len(pick), 1.9), squeeze=False)
    for j, (ax, i) in enumerate(zip(axes[0], pick.tolist())):
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        top = max(up[j].max().item(), 1e-12)   # each map on its own scale, 0 .. its max
        ax.imshow(up[j].numpy(), cmap="jet", alpha=0.4, vmin=0, vmax=top)
        if 0 < masks[i].sum() < masks[i].numel():   # an empty or full mask has no outline to draw
            ax.contour(masks[i, 0].float().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        predicted = classes[maps[j].mean((1, 2)).argmax()]
        ax.set_title(f"{classes[labels[i]]} (pred {predicted})", fontsize=7)
        ax.axis("off")
    title = f"true-class activation (logit map {tuple(maps.shape[-2:])}): {folder}"
    fig.suptitle(title, fontsize=8)
    return save_figure(plt, fig, path)

def make_figures(out, classifiers, device):
    """Every figure ([] without matplotlib); a run whose data cannot be read loses its CAM
    figure, not the report."""
    try:
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")   # files only, no display
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib; then "
              "python sweep_report.py OUT)")
        return []
    fig_dir = Path(out) / "figures"
    figs = []
    if classifiers:
        figs.append(plot_accuracy_vs_split(plt, classifiers, fig_dir / "accuracy_vs_split.png"))
    for (split, setting), runs in group(classifiers, "split", "setting").items():
        name = f"WBC_{split}_{setting}"
        title = f"{name}, {len(runs)} seed(s)"
        figs.append(plot_confusion(plt, runs, fig_dir / f"confusion_{name}.png", title))
        folder = min(runs, key=lambda r: r["seed"])["folder"]   # one seed to look at
        try:
            figs.append(plot_examples(plt, folder, fig_dir / f"cam_{name}.png", device))
        except (Exception, SystemExit) as e:
            print(f"CAM figure of {folder} skipped: {type(e).__name__}: {e}")
    return figs

def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    saved, why = read_sweep_json(args.out / "sweep.json")
    if why:   # not a sweep's folder: no results.md written into it
        raise DataError(why)
    cfg = saved | args.grid
    failures = audit_all(args.out, device)
    maskers, classifiers = collect(args.out, cfg.get("settings", []))
    missing = [f for f in cfg.get("runs", []) if not (args.out / f / "metrics.json").is_file()]
    figures = []
    if not args.no_figures:
        figures = make_figures(args.out, classifiers, device)
    print(report(args.out, cfg, maskers, classifiers, missing, figures))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}; {len(missing)} "
          f"run(s) of the grid missing")
    if failures:
        lines = [f"  {f}: {why}" for f, why in failures]
        print(f"{len(failures)} audit(s) failed:\n" + "\n".join(lines))
    return int(bool(failures))

if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as e:
        sys.exit(f"error: {e}")
