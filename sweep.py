"""The report's experiments, reproduced honestly: splits x settings x seeds, tables, figures, a shortcut audit.

    python sweep.py --data data --splits 100 10 --seeds 0 1 2 --size 64 --epochs 7 --out results/demo
    python sweep.py --synth --confound 0.9 --splits 100 10 --seeds 0 1 2 --out results/confound
    python sweep.py --out results/demo --report-only          # tables and figures again, no training

Stage 1 (train_masker.py) runs once per split, masker loss (bce, center) and masker seed; every
classifier of a split reuses the center-loss masks of the first masker seed. Stage 2
(train_classifier.py) runs once per split x setting x seed. Settings: nomask, alpha0_1, alpha1_0,
alpha-1_1, channel, each also with _balance (--settings picks some).

OUT/
  sweep.json                                   the sweep's own arguments (read back by --report-only)
  data/                                        the synthetic dataset (--synth / --confound)
  masker/WBC_<split>_<loss>_seed<k>/           masker runs: checkpoint.pt, log.csv, metrics.json, masks/
  classifier/WBC_<split>/<setting>/seed<k>/    classifier runs: args.json, leakage.json, checkpoint.pt,
                                               log.csv, metrics.json, audit.json, curves.png, stdout.log
  figures/                                     confusion, accuracy vs split, misclassified, class activation
  results.md, results.json                     the tables (also printed) and every run's numbers

Resumable: a run whose metrics.json exists is skipped. The training scripts write it last and
atomically, so a killed run has none and is redone from the start.
"""
import argparse
import csv
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (DataError, atomic_write, cache_folder, batch_indices, list_images, load_checkpoint, load_set, make_batch,
                  pick_device, precision, save_checkpoint, save_json, wbc_dirs)

HERE = Path(__file__).resolve().parent
BASE_SETTINGS = {"nomask": [], "alpha0_1": ["--alpha", "0", "1"], "alpha1_0": ["--alpha", "1", "0"],
                 "alpha-1_1": ["--alpha", "-1", "1"], "channel": ["--mask-mode", "channel"]}
# names as train_classifier.setting_name spells them, so folders and metrics agree
SETTINGS = {name + suffix: flags + extra for name, flags in BASE_SETTINGS.items()
            for suffix, extra in (("", []), ("_balance", ["--balance"]))}
MASKER_LOSSES = ("center", "bce")
# background readers (nomask, (-1, 1)) against the cell reader (1, 0) in the audit's verdict
BACKGROUND_READERS, CELL_READER = ("nomask", "alpha-1_1"), "alpha1_0"
AUDIT_VERSION = 3   # bump when audit_run changes, so older audit.json files are redone


# ---------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="dataset root in the SPEC layout (not with --synth)")
    g.add_argument("--synth", action="store_true", help="synthesise the dataset into OUT/data first (once)")
    g.add_argument("--confound", type=float, default=None,
                   help="synthesise with TRAIN background tints agreeing with the class with this probability "
                        "(implies --synth; val stays unconfounded)")
    g.add_argument("--synth-scale", type=float, default=0.1, help="synthetic dataset size, fraction of the real one")
    g.add_argument("--synth-size", type=int, default=128, help="side of the synthetic images in px")
    g.add_argument("--synth-seed", type=int, default=0, help="seed of the synthetic dataset")
    g = p.add_argument_group("grid")
    g.add_argument("--splits", type=int, nargs="+", default=[100, 10], help="WBC_<split> training sets")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds")
    g.add_argument("--masker-seeds", type=int, nargs="+", default=None,
                   help="masker seeds (default: --seeds); the classifiers use the first one's center-loss masks")
    g.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                   help=f"classifier settings (default all): {' '.join(SETTINGS)}")
    g.add_argument("--masker-losses", nargs="+", default=list(MASKER_LOSSES), choices=MASKER_LOSSES,
                   help="masker losses for the masker table (center is always run: the classifiers need it)")
    g = p.add_argument_group("training")
    g.add_argument("--size", type=int, default=64, help="working size in px of both stages (a multiple of 32)")
    # training defaults: those of `make demo`, which learn at 64 px on the synthetic data
    g.add_argument("--epochs", type=int, default=5, help="classifier epochs for WBC_100 (smaller splits get more)")
    g.add_argument("--batch-size", type=int, default=16, help="classifier images per step")
    g.add_argument("--lr", type=float, default=1e-3, help="classifier Adam learning rate")
    g.add_argument("--masker-epochs", type=int, default=15, help="masker epochs for WBC_100's masks")
    g.add_argument("--masker-batch-size", type=int, default=8, help="masker images per step")
    g.add_argument("--masker-lr", type=float, default=2e-3, help="masker Adam learning rate")
    g.add_argument("--pretrain-epochs", type=int, default=2, help="masker epochs on CAM16 first (0: none)")
    g.add_argument("--weights", default=None, help="local torchvision resnet34 state dict: ImageNet init")
    g.add_argument("--pretrained", action="store_true", help="ImageNet init via torchvision's download")
    g.add_argument("--scratch", action="store_true",
                   help="random init even where torchvision's cached ImageNet weights exist")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (training and audit)")
    g = p.add_argument_group("running")
    g.add_argument("--out", required=True, help="output folder (results/NAME)")
    g.add_argument("--in-process", action="store_true",
                   help="call each script's main() here instead of a subprocess (faster start, used by the tests)")
    g.add_argument("--report-only", action="store_true", help="no training: audit, tables and figures from OUT")
    g.add_argument("--no-figures", action="store_true", help="skip the figures (they need matplotlib)")
    g.add_argument("--keep-optimizer", action="store_true",
                   help="keep the optimizer state in finished classifier checkpoints (by default it is dropped: "
                        "244 MB -> 85 MB a run at ResNet34, 60 runs a sweep)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"--settings {unknown}: unknown (choose from {' '.join(SETTINGS)})")
    if args.confound is not None:
        if not 0 <= args.confound <= 1:
            p.error("--confound is a probability in [0, 1]")
        args.synth = True
    if args.synth and args.data:
        p.error("--synth writes OUT/data; drop --data (or drop --synth to use an existing dataset)")
    if args.size % 32 or args.size < 32:
        p.error(f"--size {args.size}: the masker's UNet needs a multiple of 32")
    if sum(bool(x) for x in (args.weights, args.pretrained, args.scratch)) > 1:
        p.error("--weights, --pretrained and --scratch each set the starting weights: pick one")
    args.out = Path(args.out)
    args.masker_seeds = args.masker_seeds or args.seeds
    args.masker_losses = ["center"] + [x for x in args.masker_losses if x != "center"]
    args.settings = [s for s in SETTINGS if s in args.settings]   # canonical order for tables


def resolve_init(args):
    """(flags for both scripts, words for the results): ImageNet where the weights are at hand."""
    if args.weights:
        return ["--weights", str(args.weights)], f"ImageNet (--weights {args.weights})"
    if args.pretrained:
        return ["--pretrained"], "ImageNet (torchvision --pretrained)"
    if not args.scratch:
        # torchvision's download cache: use it when an earlier --pretrained left it there
        from torchvision.models import ResNet34_Weights
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet34_Weights.IMAGENET1K_V1.url).name
        if cached.is_file():
            return ["--weights", str(cached)], f"ImageNet (torchvision cache {cached})"
    return [], "from scratch (random init: no --weights, --pretrained or cached torchvision resnet34 weights)"


# ---------------------------------------------------------------------------- data

def ensure_synth(root, scale, size, seed, confound):
    """Write the synthetic dataset once; ROOT/synth.json (written last) marks it complete."""
    want = {"scale": scale, "size": size, "seed": seed, "confound": confound}
    marker = Path(root) / "synth.json"
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have != want:
            raise SystemExit(f"{root}: synthesised with {have}, this sweep asks for {want}; use a new --out")
        return want
    from synth import write_synth
    print(f"synthesising {root} with {want}", flush=True)
    write_synth(root, scale=scale, size=size, seed=seed, confound=confound)   # deterministic: a redo overwrites
    save_json(want, marker)
    return want


# ---------------------------------------------------------------------------- leakage guard

@functools.lru_cache(maxsize=None)
def _sha1(path, mtime_ns, size):
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def sha1_file(path):
    """sha1 of a file's bytes, cached while its mtime and size stay the same (a sweep hashes each once)."""
    st = os.stat(path)
    return _sha1(str(path), st.st_mtime_ns, st.st_size)


def images_under(folder):
    return list_images(folder) if Path(folder).is_dir() else []


def check_leakage(data_root, split, masks_dir):
    """Check that no WBC_100/val image (by sha1 of its bytes) is among WBC_<split>'s training images
    or training masks (ground truth and generated), and that the generated masks' train folder
    holds exactly one mask per WBC_<split> training image (so the run used only that split's masks).
    Returns a JSON-able record with 'ok'."""
    dirs = wbc_dirs(data_root, split)
    val = {sha1_file(p): p for p in images_under(dirs["val_data"])}
    train = images_under(dirs["train_data"])
    generated = images_under(Path(masks_dir) / "train")
    masks = images_under(dirs["train_mask"]) + generated
    in_images = [f"{p} == {val[h]}" for p in train if (h := sha1_file(p)) in val]
    in_masks = [f"{p} == {val[h]}" for p in masks if (h := sha1_file(p)) in val]
    want = {(p.parent.name, p.stem) for p in train}
    have = {(p.parent.name, p.stem) for p in generated}
    masker_split = read_json(Path(masks_dir).parent / "metrics.json").get("split")
    record = {"val_images": len(val), "train_images": len(train), "train_masks": len(masks),
              "val_in_train_images": in_images[:20], "val_in_train_masks": in_masks[:20],
              "generated_masks": str(masks_dir), "generated_train_masks": len(generated),
              "generated_not_in_split": sorted("/".join(k) for k in have - want)[:20],
              "split_images_without_generated_mask": len(want - have) if generated else None,
              "masker_split": masker_split}
    record["ok"] = not (in_images or in_masks or (have - want) or (generated and want - have)
                        or masker_split not in (None, split))
    return record


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------- the runs

def masker_dir(out, split, loss, seed):
    return Path(out) / "masker" / f"WBC_{split}_{loss}_seed{seed}"


def classifier_dir(out, split, setting, seed):
    return Path(out) / "classifier" / f"WBC_{split}" / setting / f"seed{seed}"


def masker_runs(args, root, init_flags):
    """(script, folder, argv) of every masker run, the classifiers' masks first."""
    runs = []
    for seed in args.masker_seeds:
        for split in args.splits:
            for loss in args.masker_losses:
                out = masker_dir(args.out, split, loss, seed)
                argv = ["--data", str(root), "--split", str(split), "--size", str(args.size), "--loss", loss,
                        "--epochs", str(args.masker_epochs), "--batch-size", str(args.masker_batch_size),
                        "--lr", str(args.masker_lr), "--seed", str(seed), "--device", args.device,
                        "--out", str(out)] + init_flags
                if args.pretrain_epochs:
                    argv += ["--pretrain", "--pretrain-epochs", str(args.pretrain_epochs)]
                runs.append(("train_masker.py", out, argv))
    return runs


def classifier_runs(args, root, init_flags):
    """(script, folder, argv) of every classifier run, seed outermost so a cut-short sweep has whole tables."""
    runs = []
    for seed in args.seeds:
        for split in args.splits:
            masks = masker_dir(args.out, split, "center", args.masker_seeds[0]) / "masks"
            for setting in args.settings:
                out = classifier_dir(args.out, split, setting, seed)
                argv = ["--data", str(root), "--split", str(split), "--size", str(args.size),
                        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                        "--seed", str(seed),
                        "--masks", str(masks), "--device", args.device, "--out", str(out)]
                runs.append(("train_classifier.py", out, argv + SETTINGS[setting] + init_flags))
    return runs


def flag_values(argv):
    """['--a', '1', '2', '--b'] -> {'--a': '1 2', '--b': ''}, to name what differs between two runs."""
    out, key = {}, None
    for token in argv:
        if token.startswith("--"):
            key = token
            out[key] = ""
        elif key:
            out[key] = (out[key] + " " + token).strip()
    return out


def check_same_args(folder, argv):
    """A finished run made with other arguments would mix silently into the tables: refuse."""
    old = read_json(Path(folder) / "args.json").get("argv")
    if old is None or old == argv:
        return
    a, b = flag_values(old), flag_values(argv)
    diff = ", ".join(f"{k} {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in sorted(a.keys() | b.keys())
                     if a.get(k) != b.get(k))
    raise SystemExit(f"{folder}: finished with other arguments ({diff}); use a new --out or delete that folder")


def run_script(script, folder, argv, in_process):
    """Run one training; returns (ok, seconds, the last lines of its output on failure).

    Subprocess by default: each run gets fresh memory (no growth over 60 runs), a kill of the
    sweep kills the run cleanly, a crash or NaN abort fails one run instead of the sweep, and
    its full output lands in stdout.log. --in-process skips the ~2 s torch import per run."""
    start = time.perf_counter()
    if in_process:
        module = __import__(Path(script).stem)
        try:
            module.main(argv)
            return True, time.perf_counter() - start, ""
        except (Exception, SystemExit) as e:   # SystemExit: the scripts' clear errors
            return False, time.perf_counter() - start, f"{type(e).__name__}: {e}"
    with open(Path(folder) / "stdout.log", "w") as log:
        rc = subprocess.run([sys.executable, str(HERE / script)] + argv, stdout=log,
                            stderr=subprocess.STDOUT).returncode   # the caller's cwd: relative paths hold
    tail = "" if rc == 0 else "\n".join((Path(folder) / "stdout.log").read_text().splitlines()[-15:])
    return rc == 0, time.perf_counter() - start, tail


def execute(runs, args, what, before=None, after=None):
    """Run each (script, folder, argv) whose metrics.json is missing; returns the failures."""
    failures, todo = [], [r for r in runs if not (r[1] / "metrics.json").is_file()]
    print(f"{what}: {len(runs)} runs, {len(runs) - len(todo)} finished before (skipped), {len(todo)} to run",
          flush=True)
    for i, (script, folder, argv) in enumerate(todo, 1):
        folder.mkdir(parents=True, exist_ok=True)
        save_json({"script": script, "argv": argv}, folder / "args.json")
        if before is not None and not before(folder):
            failures.append((str(folder), "leakage check failed: see leakage.json"))
            print(f"[{i}/{len(todo)}] {folder}: leakage check FAILED, not trained (see leakage.json)", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {script} -> {folder}", flush=True)
        ok, seconds, tail = run_script(script, folder, argv, args.in_process)
        save_json({"script": script, "argv": argv, "ok": ok, "wall_seconds": seconds}, folder / "args.json")
        print(f"[{i}/{len(todo)}] {'done' if ok else 'FAILED'} in {seconds:.0f}s" + (f"\n{tail}" if tail else ""),
              flush=True)
        if not ok:
            failures.append((str(folder), tail.splitlines()[-1] if tail else "failed"))
        elif after is not None:
            failures += run_after(after, folder)
    return failures


def run_after(after, folder):
    """The post-run step (the audit); its failure is reported, not allowed to stop a long sweep."""
    try:
        after(folder)
        return []
    except Exception as e:
        import traceback
        traceback.print_exc()
        return [(str(folder), f"audit failed: {type(e).__name__}: {e}")]


def leakage_guard(root):
    """before-hook: check and record leakage.json in the run folder; False stops the run."""
    def before(folder):
        argv = read_json(folder / "args.json")["argv"]
        record = check_leakage(root, int(argv[argv.index("--split") + 1]), argv[argv.index("--masks") + 1])
        save_json(record, folder / "leakage.json")
        return record["ok"]
    return before


def slim_checkpoint(path):
    """Drop the optimizer and scheduler state of a FINISHED run's checkpoint (2/3 of its bytes;
    only resuming an unfinished run needs them). Atomic, so a kill leaves the old file whole."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" in ckpt:
        save_checkpoint({k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler")} | {"slimmed": True},
                        path)


def finish_classifier(folder, args, device):
    """After a classifier run: slim its checkpoint (first: the audit must be newer), then audit it."""
    if not args.keep_optimizer:
        slim_checkpoint(Path(folder) / "checkpoint.pt")
    audit_run(folder, device)


# ---------------------------------------------------------------------------- shortcut audit

@functools.lru_cache(maxsize=8)
def load_val(root, split, size, classes, generated):
    """WBC_100/val at `size`: (images, labels, masks the model saw as 4th channel or None,
    masks to blank with, which masks those are). Blanking uses the ground truth when every val
    image has one, else the generated masks."""
    dirs, cache = wbc_dirs(root, split), cache_folder(None)   # the training scripts' default cache
    gen = load_set(dirs["val_data"], size, classes=list(classes), mask_dirs=[Path(generated) / "val"],
                   cache_dir=cache, log=lambda *_: None)
    gen_masks = gen.masks if gen.has_mask.all() else None
    truth = load_set(dirs["val_data"], size, classes=list(classes), mask_dirs=[dirs["val_mask"]],
                     cache_dir=cache, log=lambda *_: None)
    if truth.has_mask.all():
        return truth.images, truth.labels, gen_masks, truth.masks, "ground truth (WBC_100/val/mask)"
    if gen_masks is None:
        raise DataError(f"{generated}/val: no mask for every val image, and no complete WBC_100/val/mask")
    return gen.images, gen.labels, gen_masks, gen_masks, f"generated ({generated}/val)"


def blank(images, masks, keep):
    """uint8 images (N, 3, S, S) with only the cell (keep='cell') or only the background
    (keep='background') left. Cell-only: the outside becomes one background colour shared by
    every image (a per-image colour would carry a class-tinted background along). Background-only:
    the cell, grown by a few px so its rim goes too, becomes the image's own mean background colour."""
    m = masks.float()
    s = images.shape[-1]
    grow = 2 * max(1, s // 32) + 1
    dilated = F.max_pool2d(m, grow, stride=1, padding=grow // 2)
    x = images.float()
    outside = 1 - dilated
    per_image = (x * outside).sum((2, 3), keepdim=True) / outside.sum((2, 3), keepdim=True).clamp_min(1)
    per_image = torch.where(outside.sum((2, 3), keepdim=True) > 0, per_image, torch.full_like(per_image, 128))
    if keep == "cell":
        shared = (x * outside).sum((0, 2, 3), keepdim=True) / outside.sum().clamp_min(1)
        out = x * m + shared * (1 - m)
    elif keep == "background":
        out = x * outside + per_image * dilated
    else:
        raise ValueError(f"keep={keep!r}: 'cell' or 'background'")
    return out.round().clamp(0, 255).to(torch.uint8)


@torch.inference_mode()
def logit_maps(model, images, masks, channel, device, amp, batch_size=64):
    """forward_map of every image: (N, C, h, w) float on the CPU."""
    model.eval()
    out = []
    for idx in batch_indices(len(images), batch_size, shuffle=False):
        x, _ = make_batch(images, masks if channel else None, idx, device, train=False, mask_channel=channel)
        with amp:
            out.append(model.forward_map(x).float().cpu())
    return torch.cat(out)


def cam_inside(maps, classes, masks):
    """Per image, the share of the positive class-activation mass (map of `classes`, upsampled
    bilinearly to the image) that lies inside the mask; NaN where the map is nowhere positive."""
    cam = maps[torch.arange(len(maps)), classes].clamp_min(0)[:, None]
    up = F.interpolate(cam, size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    total, inside = up.sum((1, 2)), (up * masks[:, 0].float()).sum((1, 2))
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.full_like(total, float("nan")))


def load_classifier(folder, device):
    """(model on device, checkpoint, mask-channel?) of a finished classifier run."""
    from resnet_cls import ResNetClassifier
    ckpt = load_checkpoint(Path(folder) / "checkpoint.pt")
    channel = ckpt["args"].get("mask_mode") == "channel"
    model = ResNetClassifier(len(ckpt["classes"]), 4 if channel else 3)
    model.load_state_dict(ckpt["model"])
    return model.to(device, memory_format=torch.channels_last), ckpt, channel


def audit_run(folder, device):
    """Accuracy on full, cell-only and background-only val images, how often the blanked image keeps
    the full image's prediction, and the class-activation mass inside the mask. Writes audit.json."""
    model, ckpt, channel = load_classifier(folder, device)
    run = ckpt["args"]
    images, labels, gen_masks, masks, source = load_val(run["data"], run["split"], run["size"],
                                                        tuple(ckpt["classes"]), run["masks"])
    amp, _ = precision(device, "auto")
    maps = logit_maps(model, images, gen_masks, channel, device, amp)
    preds = maps.mean((2, 3)).argmax(1)
    cell = logit_maps(model, blank(images, masks, "cell"), gen_masks, channel, device, amp).mean((2, 3)).argmax(1)
    back = logit_maps(model, blank(images, masks, "background"), gen_masks, channel, device, amp).mean((2, 3)).argmax(1)
    share = cam_inside(maps, preds, masks)
    record = {"version": AUDIT_VERSION, "accuracy": acc(preds, labels), "cell_only_accuracy": acc(cell, labels),
              "background_only_accuracy": acc(back, labels), "cell_only_agreement": acc(cell, preds),
              "background_only_agreement": acc(back, preds),
              "cam_inside_mask": share.nanmean().item(), "mask_area": masks.float().mean().item(),
              "logit_map": list(maps.shape[-2:]), "classes_predicted": len(set(preds.tolist())),
              "blank_masks": source, "n": len(labels), "preds": preds.tolist(),
              "cell_only_preds": cell.tolist(), "background_only_preds": back.tolist()}
    save_json(record, Path(folder) / "audit.json")
    return record


def acc(a, b):
    return (a == b).float().mean().item()


def audit_all(out, device):
    """Audit every finished classifier run whose audit.json is missing or older than its checkpoint."""
    for metrics in sorted(Path(out).glob("classifier/WBC_*/*/seed*/metrics.json")):
        folder = metrics.parent
        audit = folder / "audit.json"
        if (read_json(audit).get("version") != AUDIT_VERSION
                or audit.stat().st_mtime < (folder / "checkpoint.pt").stat().st_mtime):
            audit_run(folder, device)


# ---------------------------------------------------------------------------- collecting results

def collect(out):
    """Every finished run under OUT: (masker rows, classifier rows), plain dicts."""
    maskers = []
    for path in sorted(Path(out).glob("masker/WBC_*_seed*/metrics.json")):
        m = json.loads(path.read_text())
        maskers.append(m | {"seed": int(path.parent.name.rsplit("seed", 1)[1]), "folder": str(path.parent)})
    classifiers = []
    for path in Path(out).glob("classifier/WBC_*/*/seed*/metrics.json"):
        m = json.loads(path.read_text())
        m |= {"seed": int(path.parent.name[4:]), "setting": path.parent.parent.name, "folder": str(path.parent),
              "audit": read_json(path.parent / "audit.json"), "leakage": read_json(path.parent / "leakage.json")}
        classifiers.append(m)
    order = {s: i for i, s in enumerate(SETTINGS)}
    classifiers.sort(key=lambda r: (-r["split"], order.get(r["setting"], 99), r["seed"]))
    return maskers, classifiers


def mean_std(values):
    """(mean, sample std or NaN below 2 values, n), NaN and None left out."""
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan"), 0
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return mean, std, len(v)


def fmt(values, scale=100.0, digits=1):
    """'81.2 ± 2.3' (mean ± std over seeds), '81.2' for one value, '-' for none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text if n == 1 else f"{text} ± {std * scale:.{digits}f}"


def paired(a, b):
    """Paired comparison of {seed: value} dicts a vs b over their common seeds: mean difference a - b,
    std of the differences, n, and whether |mean| > 2 standard errors ('beyond seed noise')."""
    seeds = sorted(a.keys() & b.keys())
    diffs = [a[s] - b[s] for s in seeds]
    mean, std, n = mean_std(diffs)
    if n < 2:
        return {"mean": mean, "std": std, "n": n, "verdict": "n < 2: no noise estimate"}
    se = std / math.sqrt(n)
    verdict = "beyond seed noise" if abs(mean) > 2 * se else "within seed noise"
    if std == 0:   # e.g. two models that each predict one class whatever the seed: say so
        verdict += " (every seed gives the same difference)"
    return {"mean": mean, "std": std, "n": n, "se": se, "verdict": verdict}


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def group(rows, *keys):
    """{(row[k] for k in keys): [rows]} in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def by_seed(rows, get):
    return {r["seed"]: v for r in rows if (v := get(r)) is not None}


# ---------------------------------------------------------------------------- tables

def masker_table(maskers):
    rows = []
    for (split, loss), runs in sorted(group(maskers, "split", "loss").items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        held = [r.get("held_out", {}) for r in runs]
        rows.append([f"WBC_{split}", loss, fmt([r["train"]["pixel_error"] for r in runs]),
                     fmt([h.get("pixel_error") for h in held]), fmt([h.get("iou") for h in held], 1, 3),
                     fmt([h.get("dice") for h in held], 1, 3), fmt([r["train"]["dice"] for r in runs], 1, 3),
                     len(runs)])
    return md_table(["split", "loss", "train pixel error %", "held-out pixel error %", "held-out IoU",
                     "held-out Dice", "train Dice", "seeds"], rows)


def classifier_table(classifiers):
    rows = []
    for (split, setting), runs in group(classifiers, "split", "setting").items():
        rows.append([f"WBC_{split}", setting, fmt([r["accuracy"] for r in runs]),
                     fmt([r["balanced_accuracy"] for r in runs]), fmt([r["macro_f1"] for r in runs], 1, 3),
                     f"{100 * runs[0]['majority_baseline']:.1f}", len(runs)])
    return md_table(["split", "setting", "val accuracy %", "balanced accuracy %", "macro F1",
                     "majority baseline %", "seeds"], rows)


def baseline_of(setting):
    return "nomask_balance" if setting.endswith("_balance") else "nomask"


def paired_rows(classifiers, metric, settings=None, baseline=baseline_of):
    """One row per split x setting: setting vs its baseline on `metric` (a function of a run)."""
    rows = []
    for split, runs in group(classifiers, "split").items():
        per = group(runs, "setting")
        for (setting,), these in per.items():
            base = baseline(setting)
            if (settings and setting not in settings) or base == setting or (base,) not in per:
                continue   # the baseline itself, or a pair with a missing side
            p = paired(by_seed(these, metric), by_seed(per[(base,)], metric))
            rows.append([f"WBC_{split[0]}", f"{setting} - {base}", f"{100 * p['mean']:+.1f}",
                         "-" if math.isnan(p["std"]) else f"{100 * p['std']:.1f}", p["n"], p["verdict"]])
    return rows


def paired_table(classifiers):
    header = ["split", "difference", "mean diff (points)", "std of diffs", "seeds", "|mean| > 2 SE?"]
    return ("Accuracy:\n\n" + md_table(header, paired_rows(classifiers, lambda r: r["accuracy"]))
            + "\n\nBalanced accuracy:\n\n"
            + md_table(header, paired_rows(classifiers, lambda r: r["balanced_accuracy"])))


def balance_tables(classifiers):
    """The report's class-balance table per split: per-class error, weighted mean and std, each
    setting next to its --balance twin."""
    parts = []
    for (split,), runs in group(classifiers, "split").items():
        per = group(runs, "setting")
        settings = [s for (s,) in per]
        classes = list(runs[0]["per_class_error"])
        rows = [[f"{c} (n={runs[0]['support'][c]})"] + [fmt([r["per_class_error"][c] for r in per[(s,)]])
                                                       for s in settings] for c in classes]
        rows.append(["weighted mean"] + [fmt([r["weighted_mean_error"] for r in per[(s,)]]) for s in settings])
        rows.append(["std over classes"] + [fmt([r["per_class_error_std"] for r in per[(s,)]]) for s in settings])
        parts.append(f"WBC_{split}, error % (mean ± std over seeds):\n\n" + md_table(["class"] + settings, rows))
    return "\n\n".join(parts)


AUDIT_COLUMNS = (("accuracy", "val acc %"), ("cell_only_accuracy", "cell-only acc %"),
                 ("background_only_accuracy", "background-only acc %"),
                 ("cell_only_agreement", "cell-only keeps pred %"),
                 ("background_only_agreement", "background-only keeps pred %"),
                 ("cam_inside_mask", "CAM mass in mask %"), ("mask_area", "mask area %"))
# a model that predicts one class keeps its prediction on any input: this column shows it


def audit_table(classifiers):
    rows = []
    for (split, setting), runs in group(classifiers, "split", "setting").items():
        rows.append([f"WBC_{split}", setting] + [fmt([r["audit"].get(k) for r in runs]) for k, _ in AUDIT_COLUMNS]
                    + [fmt([r["audit"].get("classes_predicted") for r in runs], 1, 1)])
    return md_table(["split", "setting"] + [name for _, name in AUDIT_COLUMNS] + ["classes predicted"], rows)


def reader_verdict(classifiers):
    """Does a background reader (nomask, (-1, 1)) differ from the cell reader ((1, 0))? Paired
    differences of the audit's shortcut signals, same balance setting."""
    def cell_reader(setting):
        return CELL_READER + ("_balance" if setting.endswith("_balance") else "")
    readers = {s + b for s in BACKGROUND_READERS for b in ("", "_balance")}
    header = ["split", "difference", "mean diff (points)", "std of diffs", "seeds", "|mean| > 2 SE?"]
    parts = []
    for key, words in (("cell_only_agreement", "cell-only images keep the prediction"),
                       ("background_only_agreement", "background-only images keep the prediction"),
                       ("cam_inside_mask", "class-activation mass inside the mask"),
                       ("accuracy", "val accuracy")):
        rows = paired_rows(classifiers, lambda r, k=key: r["audit"].get(k), readers, cell_reader)
        parts.append(f"{words}:\n\n" + (md_table(header, rows) if rows else "(needs both kinds of run)"))
    return "\n\n".join(parts)


def leakage_line(classifiers):
    checked = [r for r in classifiers if r["leakage"]]
    bad = [r["folder"] for r in checked if not r["leakage"].get("ok")]
    text = f"{len(checked)} of {len(classifiers)} classifier runs checked (leakage.json), {len(bad)} failed"
    return text + (": " + ", ".join(bad) if bad else "")


def report(out, maskers, classifiers, figures):
    """results.md: the sweep's set-up, then every table."""
    cfg = read_json(Path(out) / "sweep.json")
    audited = next((r["audit"] for r in classifiers if r["audit"]), {})
    blank_source, map_size = audited.get("blank_masks", "-"), "x".join(map(str, audited.get("logit_map", "?")))
    seconds = sum(r.get("seconds", 0) for r in classifiers)
    lines = [f"# Sweep results: {out}", "",
             f"- data: {cfg.get('data', '?')}" + (f" (synthetic {cfg['synth']})" if cfg.get("synth") else ""),
             f"- init: {cfg.get('init', '?')}",
             f"- size {cfg.get('size', '?')} px, classifier epochs {cfg.get('epochs', '?')} for WBC_100 (smaller "
             f"splits get proportionally more), masker epochs {cfg.get('masker_epochs', '?')}, "
             f"CAM16 pretraining epochs {cfg.get('pretrain_epochs', '?')}",
             f"- classifiers use the center-loss masks of masker seed {cfg.get('masker_seeds', ['?'])[0]}",
             f"- mean ± std: sample std over seeds; classifier training time in all {seconds / 60:.1f} min",
             f"- leakage guard: {leakage_line(classifiers)}",
             f"- audit blanks with the {blank_source} masks; the logit map is {map_size} (size/32), so at small "
             f"sizes the class-activation share is coarse", "",
             "## Masker (stage 1), held out = WBC_100/val/mask", "", masker_table(maskers), "",
             "## Classifier (stage 2) on WBC_100/val", "", classifier_table(classifiers), "",
             "## Mask guidance vs no mask, paired by seed", "",
             "Difference of each setting from `nomask` (or `nomask_balance`) with the same seed, in points; "
             "'beyond seed noise' when |mean| exceeds twice its standard error (std/sqrt(n)).", "",
             paired_table(classifiers), "",
             "## Class balance: per-class error before/after --balance", "", balance_tables(classifiers), "",
             "## Shortcut audit", "",
             "Cell-only: outside the mask painted one shared background colour; background-only: the cell "
             "(grown by a few px) painted the image's own mean background colour. 'keeps pred': how often the "
             "blanked image gets the full image's prediction. CAM mass: share of the predicted class's positive "
             "logit map, upsampled, inside the mask (mask area = what a uniform map would score).", "",
             audit_table(classifiers), "",
             "### Background readers (nomask, alpha-1_1) vs the cell reader (alpha1_0), paired by seed", "",
             reader_verdict(classifiers), ""]
    if figures:
        lines += ["## Figures", ""] + [f"- [{Path(f).name}]({Path(f).relative_to(out)})" for f in figures] + [""]
    text = "\n".join(lines)
    atomic_write(Path(out) / "results.md", lambda f: f.write(text.encode()))
    save_json({"config": cfg, "maskers": maskers,
               "classifiers": [{k: v for k, v in r.items() if k != "audit"}
                               | {"audit": {k: v for k, v in r["audit"].items() if not k.endswith("preds")}}
                               for r in classifiers]}, Path(out) / "results.json")
    return text


# ---------------------------------------------------------------------------- figures (matplotlib, optional)

def import_pyplot():
    """matplotlib.pyplot with a file-only backend, or None (figures are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib, then "
              "python sweep.py --out OUT --report-only)")
        return None


def save_figure(plt, fig, path):
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_curves(plt, folder):
    """train/val loss and accuracy by epoch from the run's log.csv -> curves.png beside it."""
    with open(Path(folder) / "log.csv") as f:
        rows = list(csv.DictReader(f))
    epoch = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
    for key, ax in (("loss", ax1), ("acc", ax2)):
        for part in ("train", "val"):
            ax.plot(epoch, [float(r[f"{part}_{key}"]) for r in rows], marker="o", label=part)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        if key == "loss":
            ax.set_yscale("log")   # an early val loss can be 1000x the last one
        ax.legend()
    fig.suptitle(str(Path(folder).relative_to(Path(folder).parents[3])), fontsize=9)
    return save_figure(plt, fig, Path(folder) / "curves.png")


def plot_confusion(plt, runs, path, title):
    """Confusion matrix summed over seeds, colours row-normalised (recall), counts written in."""
    classes = list(runs[0]["support"])
    conf = torch.tensor([r["confusion"] for r in runs]).sum(0).float()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow((conf / conf.sum(1, keepdim=True).clamp_min(1)).numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)), [c[:4] for c in classes])
    ax.set_yticks(range(len(classes)), [c[:4] for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return save_figure(plt, fig, path)


def plot_accuracy_vs_split(plt, classifiers, path):
    """Val accuracy against the training fraction, one line per setting, error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (setting,), runs in group(classifiers, "setting").items():
        points = sorted((split, mean_std([r["accuracy"] for r in these])) for (split,), these in
                        group(runs, "split").items())
        ax.errorbar([p[0] for p in points], [100 * p[1][0] for p in points],
                    yerr=[0 if math.isnan(p[1][1]) else 100 * p[1][1] for p in points], marker="o", capsize=3,
                    label=setting)
    ax.axhline(100 * classifiers[0]["majority_baseline"], color="grey", linestyle="--", label="majority")
    ax.set_xscale("log")
    splits = sorted({r["split"] for r in classifiers})
    ax.set_xticks(splits, [str(s) for s in splits])
    ax.set_xlabel("training data (% of WBC_100)")
    ax.set_ylabel("val accuracy %")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def overlay(ax, image, mask, title, heat=None):
    """One panel: the image, an optional heat map on top, the mask's outline in green."""
    ax.imshow(image.permute(1, 2, 0).numpy())
    if heat is not None:
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if 0 < mask.sum() < mask.numel():   # an empty or full mask has no outline to draw
        ax.contour(mask[0].float().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def plot_gallery(plt, folder, path, limit=16):
    """Misclassified val cells of one run, mask outline on top, titled true -> predicted."""
    ckpt = load_checkpoint(Path(folder) / "checkpoint.pt")
    run, classes = ckpt["args"], ckpt["classes"]
    images, labels, _, masks, _ = load_val(run["data"], run["split"], run["size"], tuple(classes), run["masks"])
    preds = torch.tensor(read_json(Path(folder) / "audit.json")["preds"])
    wrong = (preds != labels).nonzero()[:, 0][:limit].tolist()
    if not wrong:
        return None
    cols = min(8, len(wrong))
    rows = math.ceil(len(wrong) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        overlay(ax, images[i], masks[i], f"{classes[labels[i]][:4]}->{classes[preds[i]][:4]}")
    fig.suptitle(f"misclassified ({len(wrong)} shown): {folder}", fontsize=8)
    return save_figure(plt, fig, path)


def plot_cams(plt, folder, path, device, per_class=2):
    """Class-activation maps of the true class (positive part of the logit map, upsampled,
    scaled to its maximum) over a few val cells of each class, with the mask outline."""
    model, ckpt, channel = load_classifier(folder, device)
    run, classes = ckpt["args"], ckpt["classes"]
    images, labels, gen_masks, masks, _ = load_val(run["data"], run["split"], run["size"], tuple(classes),
                                                   run["masks"])
    pick = torch.cat([(labels == c).nonzero()[:per_class, 0] for c in range(len(classes))])
    amp, _ = precision(device, "auto")
    maps = logit_maps(model, images[pick], None if gen_masks is None else gen_masks[pick], channel, device, amp)
    cam = maps[torch.arange(len(pick)), labels[pick]].clamp_min(0)[:, None]
    up = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    up = up / up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    preds = maps.mean((2, 3)).argmax(1)
    fig, axes = plt.subplots(2, len(pick), figsize=(1.4 * len(pick), 3.2), squeeze=False)
    for j, i in enumerate(pick.tolist()):
        overlay(axes[0, j], images[i], masks[i], f"{classes[labels[i]][:4]} (pred {classes[preds[j]][:4]})")
        overlay(axes[1, j], images[i], masks[i], f"map {tuple(maps.shape[-2:])}", heat=up[j])
    fig.suptitle(f"true-class activation: {folder}", fontsize=8)
    return save_figure(plt, fig, path)


def make_figures(out, classifiers, device):
    """Every figure, or [] without matplotlib. Per-run curves are redrawn only when their log changed."""
    plt = import_pyplot()
    if plt is None or not classifiers:
        return []
    figs, fig_dir = [], Path(out) / "figures"
    for r in classifiers:
        png = Path(r["folder"]) / "curves.png"
        if not png.is_file() or png.stat().st_mtime < (Path(r["folder"]) / "log.csv").stat().st_mtime:
            plot_curves(plt, r["folder"])
    figs.append(plot_accuracy_vs_split(plt, classifiers, fig_dir / "accuracy_vs_split.png"))
    for (split, setting), runs in group(classifiers, "split", "setting").items():
        name = f"WBC_{split}_{setting}"
        figs.append(plot_confusion(plt, runs, fig_dir / f"confusion_{name}.png",
                                   f"{name}, summed over {len(runs)} seed(s)"))
        first = min(runs, key=lambda r: r["seed"])["folder"]   # one seed is enough to look at
        if (Path(first) / "audit.json").is_file():
            figs.append(plot_gallery(plt, first, fig_dir / f"misclassified_{name}.png"))
        figs.append(plot_cams(plt, first, fig_dir / f"cam_{name}.png", device))
    return [f for f in figs if f is not None]


# ---------------------------------------------------------------------------- main

def prepare(args):
    """Dataset root and init flags; records the sweep's arguments in OUT/sweep.json."""
    args.out.mkdir(parents=True, exist_ok=True)
    synth = None
    if args.synth:
        root = args.out / "data"
        synth = ensure_synth(root, args.synth_scale, args.synth_size, args.synth_seed, args.confound or 0.0)
    else:
        root = Path(args.data or "data")
    init_flags, init_words = resolve_init(args)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    save_json(cfg | {"data": str(root), "synth": synth, "init": init_words}, args.out / "sweep.json")
    print(f"data {root} | init: {init_words}", flush=True)
    return root, init_flags


def train_everything(args, root, init_flags, device):
    maskers, classifiers = masker_runs(args, root, init_flags), classifier_runs(args, root, init_flags)
    for _, folder, argv in maskers + classifiers:   # before any training: a mismatch stops the sweep
        if (folder / "metrics.json").is_file():
            check_same_args(folder, argv)
    failures = execute(maskers, args, "masker")
    failures += execute(classifiers, args, "classifier", before=leakage_guard(root),
                        after=lambda folder: finish_classifier(folder, args, device))
    return failures


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    failures = []
    if not args.report_only:
        root, init_flags = prepare(args)
        for split in args.splits:
            wbc_dirs(root, split)   # fail before any training when the layout is wrong
        failures = train_everything(args, root, init_flags, device)
    audit_all(args.out, device)
    maskers, classifiers = collect(args.out)
    figures = [] if args.no_figures else make_figures(args.out, classifiers, device)
    text = report(args.out, maskers, classifiers, figures)
    print(text)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    if failures:
        print(f"{len(failures)} run(s) failed:\n" + "\n".join(f"  {f}: {why}" for f, why in failures))
    return {"maskers": maskers, "classifiers": classifiers, "failures": failures, "figures": figures}


if __name__ == "__main__":
    try:
        result = main()
    except DataError as e:
        raise SystemExit(f"error: {e}")
    sys.exit(1 if result["failures"] else 0)
