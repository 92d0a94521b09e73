"""sweep.py's report of whatever has finished under OUT: each classifier's shortcut audit (audit.json), paired
statistics, tables (OUT/results.md, .json), figures (OUT/figures/, needs matplotlib), the grid's missing runs.

    python sweep_report.py results/demo [--device cpu] [--no-figures]     # what `sweep.py --report-only` runs
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

from data import (DataError, atomic_write, infer, load_checkpoint, load_set, save_json, wbc_dirs,
                  white_balance)
from resnet_cls import ResNetClassifier

CONTROLS = ("nomask", "alpha0_1")   # every mask setting vs both; alpha0_1: the same per-location loss, uniform weights
CACHE = ".cache/decoded"   # the trainers' default decode cache: the audit shares it
AUDIT_VERSION = 5          # bump when audit_run changes, so older audit.json files are redone

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

@functools.lru_cache(maxsize=8)
def load_val(root, split, size, classes, generated):
    """WBC_100/val: images, labels, generated masks or None, masks to blank with (truth if complete), their name."""
    dirs, quiet = wbc_dirs(root, split), (lambda *_: None)
    gen = load_set(dirs["val_data"], size, list(classes), [Path(generated) / "val"], CACHE, log=quiet)
    truth = load_set(dirs["val_data"], size, list(classes), [dirs["val_mask"]], CACHE, log=quiet)
    gen_masks = gen.masks if gen.has_mask.all() else None
    if truth.has_mask.all():
        return truth.images, truth.labels, gen_masks, truth.masks, "ground truth (WBC_100/val/mask)"
    if gen_masks is None:
        raise DataError(f"{generated}/val: no mask for every val image, and no complete WBC_100/val/mask")
    return gen.images, gen.labels, gen_masks, gen_masks, f"generated ({generated}/val)"

def blank(images, masks, keep):
    """Images with only the cell (keep='cell') or the background left. Cell-only: the outside gets ONE colour shared
    by all images (its own would carry a class tint). Background-only: the cell, grown, gets the mean background."""
    m, x, grow = masks.float(), images.float(), 2 * max(1, images.shape[-1] // 32) + 1
    outside = 1 - F.max_pool2d(m, grow, stride=1, padding=grow // 2)
    area = outside.sum((2, 3), keepdim=True)
    if keep == "cell":
        out = x * m + (x * outside).sum((0, 2, 3), keepdim=True) / outside.sum().clamp_min(1) * (1 - m)
    elif keep == "background":
        own = torch.where(area > 0, (x * outside).sum((2, 3), keepdim=True) / area.clamp_min(1), 128.0)
        out = x * outside + own * (1 - outside)
    else:
        raise ValueError(f"keep={keep!r}: 'cell' or 'background'")
    return out.round().clamp(0, 255).to(torch.uint8)

def cam_inside(maps, classes, masks):
    """(N,): the share of the positive map of `classes`, upsampled to the masks' size, inside the mask (NaN: none)."""
    cam = maps[torch.arange(len(maps)), classes].clamp_min(0)[:, None]
    up = F.interpolate(cam, size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    total, inside = up.sum((1, 2)), (up * masks[:, 0].float()).sum((1, 2))
    return torch.where(total > 0, inside / total.clamp_min(1e-12), float("nan"))

def load_run(folder, device):
    """(model giving logit maps, checkpoint, mask channel?, load_val's 5-tuple) of a finished classifier run."""
    ckpt = load_checkpoint(Path(folder) / "checkpoint.pt", ("classes",))
    run, channel = ckpt["args"], ckpt["args"].get("mask_mode") == "channel"   # only keys every version has
    model = ResNetClassifier(len(ckpt["classes"]), 4 if channel else 3)
    model.load_state_dict(ckpt["model"])
    model.forward = model.forward_map
    val = load_val(str(run["data"]), run["split"], run["size"], tuple(ckpt["classes"]), str(run["masks"]))
    if channel and val[2] is None:
        raise DataError(f"{folder}: a mask-channel model, and {run['masks']}/val lacks masks of val images")
    return model.to(device, memory_format=torch.channels_last), ckpt, channel, val

def pick_amp(device):
    """The --amp auto rule: bf16 where `device` computes it natively, fp16 on older GPUs, else
    off."""
    if device.type == "cuda":   # not is_bf16_supported(): True on a T4, which emulates bf16 slowly
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        return "bf16" if native_bf16 else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "off"

def logit_maps(model, images, masks, channel, device):
    """(N, C, h, w) float on the CPU; autocast by the trainers' rule for `device`."""
    amp = pick_amp(device)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16   # inference: fp16 needs no scaler
    autocast = torch.autocast(device.type, dtype, enabled=amp != "off")
    return infer(model, images, masks, 64, device, autocast, mask_channel=channel)

def balanced(images, chunk=64):
    """uint8 images as the classifier sees them under --white-balance (data.white_balance)."""
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):   # float copies of all of val are big
        x = images[start:start + chunk].float() / 255
        out[start:start + chunk] = (white_balance(x) * 255).round().to(torch.uint8)
    return out

def blanked_views(images, masks, gen_masks, white):
    """{'full', 'cell', 'background': (uint8 images, their 4th channel or None)}, as the
    classifier sees them: white-balanced first (then blanked), and no cell in the
    background-only view's 4th channel."""
    seen = balanced(images) if white else images
    no_cell = None if gen_masks is None else torch.zeros_like(gen_masks)
    return {"full": (seen, gen_masks), "cell": (blank(seen, masks, "cell"), gen_masks),
            "background": (blank(seen, masks, "background"), no_cell)}

def audit_run(folder, device):
    """audit.json: accuracy on full, cell-only and background-only val images, agreement, CAM share in the mask."""
    model, ckpt, channel, (images, labels, gen_masks, masks, source) = load_run(folder, device)
    views = blanked_views(images, masks, gen_masks, bool(ckpt["args"].get("white_balance")))
    maps = logit_maps(model, *views["full"], channel, device)
    preds = maps.mean((2, 3)).argmax(1)
    cell, back = (logit_maps(model, *views[keep], channel, device).mean((2, 3)).argmax(1)
                  for keep in ("cell", "background"))
    acc = lambda a, b: (a == b).float().mean().item()   # noqa: E731
    record = {"version": AUDIT_VERSION, "accuracy": acc(preds, labels), "cell_only_accuracy": acc(cell, labels),
              "background_only_accuracy": acc(back, labels), "cell_only_agreement": acc(cell, preds),
              "background_only_agreement": acc(back, preds), "mask_area": masks.float().mean().item(),
              "cam_inside_mask": cam_inside(maps, preds, masks).nanmean().item(), "logit_map": list(maps.shape[-2:]),
              "classes_predicted": len(set(preds.tolist())), "blank_masks": source, "n": len(labels)}
    save_json(record, Path(folder) / "audit.json")
    return record

def audit_all(out, device):
    """Audit the finished classifier runs under OUT without a current audit.json; failures listed."""
    failures = []
    for folder in sorted(p.parent for p in Path(out).glob("classifier/WBC_*/*/seed*/metrics.json")):
        audit, ckpt = folder / "audit.json", folder / "checkpoint.pt"
        try:
            current = read_json(audit).get("version") == AUDIT_VERSION
        except DataError:   # a damaged audit.json is redone
            current = False
        if not current or audit.stat().st_mtime < ckpt.stat().st_mtime:
            try:
                audit_run(folder, device)
            except (Exception, SystemExit) as e:   # SystemExit: load_checkpoint's clear errors; listed by main
                failures.append((str(folder), f"audit failed: {type(e).__name__}: {e}"))
    return failures

def mean_std(values):
    """(mean, sample std (NaN below 2 values), n) of the values that are not None or NaN."""
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    mean = sum(v) / len(v) if v else float("nan")
    return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan"), len(v)

def t_cdf(t, df):
    """P(T <= t) of Student's t, integer df >= 1, exact: the finite series of Abramowitz & Stegun 26.7.3-4."""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, term, total = math.cos(theta) ** 2, 1.0, float(df > 1)   # df 1 (Cauchy): theta alone
    for k in range(1 + df % 2, df - 1, 2):   # odd df: k = 2, 4 .. df-3; even df: k = 1, 3 .. df-3
        term *= cos2 * k / (k + 1)
        total += term
    inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total) if df % 2 else math.sin(theta) * total
    return 0.5 + math.copysign(inside / 2, t)

def sign_flip_p(diffs):
    """Exact two-sided p: the share of the 2^n sign flips of the differences with |sum| >= the observed (>= 2/2^n)."""
    if not diffs:
        return float("nan")
    observed = abs(sum(diffs)) - 1e-9 * max(1.0, sum(map(abs, diffs)))   # float sums of a tie differ in the last bits
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed for signs in flips) / len(flips)

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
    """{seed: value} a - b over common seeds: mean, std, n, paired t-test p (NaN below 2 seeds) and sign_flip_p."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    mean, std, n = mean_std(diffs)
    p_t = paired_t_p(mean, std, n)
    return {"mean": mean, "std": std, "n": n, "p_t": p_t, "p_perm": sign_flip_p(diffs)}

def comparisons(classifiers, key):
    """Each mask setting minus each CONTROLS setting of its split and balance, paired by seed, on value(run, key)."""
    rows, per = [], group(classifiers, "split", "setting")
    for (split, setting), these in per.items():
        suffix = "_balance" if setting.endswith("_balance") else ""
        for control in (c + suffix for c in CONTROLS):
            if setting not in ("nomask" + suffix, control) and (split, control) in per:
                a, b = ({r["seed"]: v for r in rs if (v := value(r, key)) is not None}
                        for rs in (these, per[split, control]))
                rows.append({"metric": key, "split": split, "setting": setting, "control": control} | paired(a, b))
    return rows

def collect(out, settings):
    """Every finished run under OUT, each once: (masker rows, classifier rows), plain dicts, in table order."""
    maskers = sorted((read_json(p) | {"seed": int(p.parent.name.rsplit("seed", 1)[1]), "folder": str(p.parent)}
                      for p in Path(out).glob("masker/WBC_*_seed*/metrics.json")),
                     key=lambda r: (-r["split"], r["loss"], r["seed"]))
    runs = [read_json(p) | {"seed": int(p.parent.name[4:]), "setting": p.parent.parent.name, "folder": str(p.parent),
                            "split": int(p.parents[2].name[4:]), "audit": read_json(p.parent / "audit.json"),
                            "leakage": read_json(p.parent / "leakage.json")}
            for p in Path(out).glob("classifier/WBC_*/*/seed*/metrics.json")]
    order = {s: i for i, s in enumerate(settings)}   # the grid's, then the rest by name
    return maskers, sorted(runs, key=lambda r: (-r["split"], order.get(r["setting"], 99), r["setting"], r["seed"]))

def group(rows, *keys):
    """{tuple(row[k] for k in keys): [rows]} in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out

def value(run, key):
    """A run's number: `key` of metrics.json, else of audit.json; or a path like ("held_out", "iou"). None if absent."""
    if isinstance(key, str):
        return run[key] if key in run else run.get("audit", {}).get(key)
    for k in key:
        run = run.get(k) if isinstance(run, dict) else None
    return run

def fmt(values, scale=100.0, digits=1):
    """'81.2 ± 2.3' (mean ± sample std), '81.2' for one value, '-' for none."""
    mean, std, n = mean_std(values)
    return "-" if n == 0 else f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if n > 1 else "")

def md_table(header, rows):
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in [header, ["---"] * len(header)] + rows)

def mean_table(runs, by, columns):
    """One row per split and runs[by]; each column (name, value() key, scale, digits) as mean ± std over seeds."""
    rows = [[f"WBC_{split}", name] + [fmt([value(r, k) for r in rs], s, d) for _, k, s, d in columns] + [len(rs)]
            for (split, name), rs in group(runs, "split", by).items()]
    return md_table(["split", by] + [c[0] for c in columns] + ["seeds"], rows)

MASKER_COLUMNS = (("train pixel error %", ("train", "pixel_error"), 100, 1), ("train Dice", ("train", "dice"), 1, 3),
                  ("held-out pixel error %", ("held_out", "pixel_error"), 100, 1),
                  ("held-out IoU", ("held_out", "iou"), 1, 3), ("held-out Dice", ("held_out", "dice"), 1, 3))
CLASSIFIER_COLUMNS = (("val accuracy %", "accuracy", 100, 1), ("balanced accuracy %", "balanced_accuracy", 100, 1),
                      ("macro F1", "macro_f1", 1, 3))
AUDIT_COLUMNS = tuple((n, k, 100, 1) for n, k in (("val acc %", "accuracy"), ("cell-only acc %", "cell_only_accuracy"),
    ("background-only acc %", "background_only_accuracy"), ("cell-only keeps pred %", "cell_only_agreement"),
    ("background-only keeps pred %", "background_only_agreement"), ("CAM share in mask %", "cam_inside_mask"),
    ("mask area %", "mask_area"))) + (("classes predicted", "classes_predicted", 1, 1),)   # 1: keeps any prediction
PAIRED_METRICS = (("accuracy", "Val accuracy"), ("balanced_accuracy", "Balanced accuracy"),
                  ("cell_only_agreement", "Cell-only images keep the prediction (audit)"),
                  ("background_only_agreement", "Background-only images keep the prediction (audit)"),
                  ("cam_inside_mask", "Class-activation share inside the mask (audit)"))

def paired_tables(stats):
    """One table per metric of PAIRED_METRICS from comparisons() rows."""
    p = lambda x: "-" if math.isnan(x) else f"{x:.3f}"   # noqa: E731
    return "\n\n".join(f"{words}:\n\n" + md_table(
        ["split", "difference", "seeds", "mean diff (points)", "std of diffs", "p (paired t)", "p (sign-flip, exact)"],
        [[f"WBC_{r['split']}", f"{r['setting']} - {r['control']}", r["n"], f"{100 * r['mean']:+.1f}",
          "-" if math.isnan(r["std"]) else f"{100 * r['std']:.1f}", p(r["p_t"]), p(r["p_perm"])]
         for r in stats if r["metric"] == key]) for key, words in PAIRED_METRICS)

def report(out, cfg, maskers, classifiers, missing, figures):
    """results.md (set-up, missing runs, every table) and results.json; returns the markdown."""
    first = (classifiers or [{}])[0]
    stats = [row for key, _ in PAIRED_METRICS for row in comparisons(classifiers, key)]
    audited = next((r["audit"] for r in classifiers if r["audit"]), {})
    leaks = [r["folder"] for r in classifiers if r["leakage"] and not r["leakage"].get("ok")]
    per_class = [(f"{c} (n={n}) error %", ("per_class_error", c), 100, 1) for c, n in first.get("support", {}).items()]
    synth = f" (synthetic {cfg['synth']})" if cfg.get("synth") else ""
    links = ["## Figures", ""] + [f"- [{Path(f).name}]({Path(f).relative_to(out)})" for f in figures] + [""]
    text = "\n".join([
        f"# Sweep results: {out}", "", f"- data {cfg.get('data')}{synth}; init {cfg.get('init')}",
        f"- {cfg.get('size')} px; WBC_100 epochs (more for smaller splits): classifier {cfg.get('epochs')}, masker "
        f"{cfg.get('masker_epochs')} + {cfg.get('pretrain_epochs')} on CAM16; "
        f"masks of masker seed {cfg.get('masker_seeds', '?')[0]}",
        f"- finished: {len(maskers)} masker, {len(classifiers)} classifier runs; majority baseline on val "
        + ", ".join(sorted({f"{100 * r['majority_baseline']:.1f}%" for r in classifiers})),
        f"- missing from the grid: {len(missing)}" + "".join(f"\n  - {m}" for m in missing),
        f"- leakage guard: {sum(bool(r['leakage']) for r in classifiers)} of {len(classifiers)} classifier runs "
        f"checked, {len(leaks)} failed" + (": " + ", ".join(leaks) if leaks else ""), "",
        "## Masker (stage 1), held out = WBC_100/val/mask", "", mean_table(maskers, "loss", MASKER_COLUMNS), "",
        "## Classifier (stage 2) on WBC_100/val, mean ± sample std over seeds", "",
        mean_table(classifiers, "setting", CLASSIFIER_COLUMNS), "",
        "## Mask settings vs the controls, paired by seed", "",
        "Each setting minus `nomask` and minus `alpha0_1` (same per-location loss, uniform weights), same seed and "
        "balance, in points. p (paired t): two-sided, df = n - 1, assumes normal differences. p (sign-flip): exact, "
        "two-sided, over all 2^n sign flips; at least 2/2^n (0.25 at n = 3). A p (paired t) of '-' "
        "with a std of 0.0: every seed gave the same non-zero difference, t is undefined; read the "
        "sign-flip p.", "",
        paired_tables(stats), "",
        "## Class balance: per-class error, each setting next to its --balance twin", "",
        mean_table(classifiers, "setting", per_class + [("weighted mean error %", "weighted_mean_error", 100, 1),
                                                        ("std over classes", "per_class_error_std", 100, 1)]), "",
        "## Shortcut audit", "",
        f"Blanked with the {audited.get('blank_masks')} masks: cell-only = outside painted one shared colour, "
        "background-only = the cell (grown a few px) painted the image's mean background; 'keeps pred': as on the full "
        f"image. CAM share: of the predicted class's positive {audited.get('logit_map')} logit map, upsampled, inside "
        "the mask (a uniform map scores the mask area).", "",
        mean_table(classifiers, "setting", AUDIT_COLUMNS), ""] + (links if figures else []))
    atomic_write(out / "results.md", lambda f: f.write(text.encode()))
    save_json({"config": cfg, "missing": missing, "figures": list(map(str, figures)), "maskers": maskers,
               "stats": {"paired": stats}, "classifiers": classifiers}, out / "results.json")
    return text

def save_figure(plt, fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)

def plot_confusion(plt, runs, path, title):
    """Confusion matrix summed over seeds, colours row-normalised (recall), counts written in."""
    classes, conf = [c[:4] for c in runs[0]["support"]], torch.tensor([r["confusion"] for r in runs]).sum(0).float()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow((conf / conf.sum(1, keepdim=True).clamp_min(1)).numpy(), cmap="Blues", vmin=0, vmax=1)
    for i, j in itertools.product(range(len(classes)), repeat=2):
        ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=8)
    ax.set(xticks=range(len(classes)), xticklabels=classes, yticks=range(len(classes)), yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    return save_figure(plt, fig, path)

def plot_accuracy_vs_split(plt, classifiers, path):
    """Val accuracy against the training fraction, one line per setting, error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (setting,), runs in group(classifiers, "setting").items():
        points = sorted((split, *mean_std([r["accuracy"] for r in rs])[:2])
                        for (split,), rs in group(runs, "split").items())
        ax.errorbar([p[0] for p in points], [100 * p[1] for p in points], marker="o", capsize=3, label=setting,
                    yerr=[0 if math.isnan(p[2]) else 100 * p[2] for p in points])
    ax.axhline(100 * classifiers[0]["majority_baseline"], color="grey", linestyle="--", label="majority")
    splits = sorted({r["split"] for r in classifiers})
    ax.set(xscale="log", xticks=splits, xticklabels=map(str, splits), xlabel="training data (% of WBC_100)",
           ylabel="val accuracy %")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)

def plot_examples(plt, folder, path, device, per_class=2):
    """A few val cells of each class under one run's true-class activation (positive logit map, upsampled)."""
    model, ckpt, channel, (images, labels, gen_masks, masks, _) = load_run(folder, device)
    classes = [c[:4] for c in ckpt["classes"]]
    pick = torch.cat([(labels == c).nonzero()[:per_class, 0] for c in range(len(classes))])
    seen = balanced(images[pick]) if ckpt["args"].get("white_balance") else images[pick]
    maps = logit_maps(model, seen, None if gen_masks is None else gen_masks[pick], channel, device)
    up = F.interpolate(maps[torch.arange(len(pick)), labels[pick]].clamp_min(0)[:, None], size=images.shape[-2:],
                       mode="bilinear", align_corners=False)[:, 0]
    fig, axes = plt.subplots(1, len(pick), figsize=(1.4 * len(pick), 1.9), squeeze=False)
    for ax, j, i in zip(axes[0], range(len(pick)), pick.tolist()):
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        ax.imshow(up[j].numpy(), cmap="jet", alpha=0.4, vmin=0, vmax=max(up[j].max().item(), 1e-12))   # 0 .. its max
        if 0 < masks[i].sum() < masks[i].numel():   # an empty or full mask has no outline to draw
            ax.contour(masks[i, 0].float().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{classes[labels[i]]} (pred {classes[maps[j].mean((1, 2)).argmax()]})", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"true-class activation (logit map {tuple(maps.shape[-2:])}): {folder}", fontsize=8)
    return save_figure(plt, fig, path)

def make_figures(out, classifiers, device):
    """Every figure ([] without matplotlib); a run whose data cannot be read loses its CAM figure, not the report."""
    try:
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")   # files only, no display
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib; then python sweep_report.py OUT)")
        return []
    fig_dir = Path(out) / "figures"
    figs = [plot_accuracy_vs_split(plt, classifiers, fig_dir / "accuracy_vs_split.png")] if classifiers else []
    for (split, setting), runs in group(classifiers, "split", "setting").items():
        name, first = f"WBC_{split}_{setting}", min(runs, key=lambda r: r["seed"])["folder"]   # one seed to look at
        figs.append(plot_confusion(plt, runs, fig_dir / f"confusion_{name}.png", f"{name}, {len(runs)} seed(s)"))
        try:
            figs.append(plot_examples(plt, first, fig_dir / f"cam_{name}.png", device))
        except (Exception, SystemExit) as e:
            print(f"CAM figure of {first} skipped: {type(e).__name__}: {e}")
    return figs

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the sweep's folder (sweep.py --out)")
    p.add_argument("--grid", type=json.loads, default={}, help="JSON over OUT/sweep.json's keys (runs, settings ...)")
    p.add_argument("--device", default="auto", help="of the audit and figures: auto (CUDA if present), cpu, cuda:1 ...")
    p.add_argument("--no-figures", action="store_true", help="skip the figures (they need matplotlib)")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    saved, why = read_sweep_json(args.out / "sweep.json")
    if why:   # not a sweep's folder: no results.md written into it
        raise DataError(why)
    cfg, failures = saved | args.grid, audit_all(args.out, device)
    maskers, classifiers = collect(args.out, cfg.get("settings", []))
    missing = [f for f in cfg.get("runs", []) if not (args.out / f / "metrics.json").is_file()]
    figures = [] if args.no_figures else make_figures(args.out, classifiers, device)
    print(report(args.out, cfg, maskers, classifiers, missing, figures))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}; {len(missing)} run(s) of the grid missing")
    if failures:
        print(f"{len(failures)} audit(s) failed:\n" + "\n".join(f"  {f}: {why}" for f, why in failures))
    return int(bool(failures))

if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as e:
        sys.exit(f"error: {e}")
