"""The report's experiments: train_masker.py and train_classifier.py over splits x settings x seeds, each run a
subprocess (fresh memory; a crash fails that run only), then a shortcut audit, paired statistics, tables and figures.

    python sweep.py --data data --splits 100 10 --seeds 0 1 2 --size 64 --epochs 7 --out results/demo
    python sweep.py --confound 0.9 --out results/confound     # synthetic data, background tint confounded
    python sweep.py --out results/demo --report-only          # audit, tables and figures of whatever has finished

Runs go to OUT/masker/WBC_<split>_<loss>_seed<k>/ and OUT/classifier/WBC_<split>/<setting>/seed<k>/ (the classifiers
use the first masker seed's center-loss masks); a run whose metrics.json (its trainer writes it last) exists is
skipped. Also OUT/sweep.json (the arguments), OUT/data/ (--synth), OUT/figures/, OUT/results.md, OUT/results.json.
"""
import argparse
import csv
import functools
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models import ResNet34_Weights

from data import DataError, atomic_write, infer, list_images, load_checkpoint, load_set, save_checkpoint, save_json, wbc_dirs
from resnet_cls import ResNetClassifier
from synth import write_synth

BASE_SETTINGS = {"nomask": [], "alpha0_1": ["--alpha", "0", "1"], "alpha1_0": ["--alpha", "1", "0"],
                 "alpha-1_1": ["--alpha", "-1", "1"], "channel": ["--mask-mode", "channel"]}
SETTINGS = {name + suffix: flags + extra for name, flags in BASE_SETTINGS.items()   # train_classifier.py's names
            for suffix, extra in (("", []), ("_balance", ["--balance"]))}
MASKER_LOSSES = ("center", "bce")
# every mask setting vs both: nomask, and alpha0_1, the clean control (the same per-location loss, uniform weights)
CONTROLS = ("nomask", "alpha0_1")
HERE = Path(__file__).resolve().parent
GRID = {"splits": [100, 10], "seeds": [0, 1, 2], "masker_seeds": None, "settings": list(SETTINGS), "masker_losses": MASKER_LOSSES}
CACHE = ".cache/decoded"   # the trainers' default decode cache: the audit shares it
AUDIT_VERSION = 4          # bump when audit_run changes, so older audit.json files are redone

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset root: ROOT/WBC_<split>/train, ROOT/WBC_100/val (not with --synth)")
    g.add_argument("--synth", action="store_true", help="synthesise the dataset into OUT/data first (once)")
    g.add_argument("--confound", type=float, help="(implies --synth) train tints follow the class with this probability")
    g.add_argument("--synth-scale", type=float, default=0.1, help="synthetic dataset size, fraction of the real one")
    g.add_argument("--synth-size", type=int, default=128, help="side of the synthetic images in px")
    g.add_argument("--synth-seed", type=int, default=0, help="seed of the synthetic dataset")
    g = p.add_argument_group("grid (with --report-only, a flag left out is read from OUT/sweep.json)")
    g.add_argument("--splits", type=int, nargs="+", help="WBC_<split> training sets (default 100 10)")
    g.add_argument("--seeds", type=int, nargs="+", help="classifier seeds (default 0 1 2)")
    g.add_argument("--masker-seeds", type=int, nargs="+", help="masker seeds (default --seeds)")
    g.add_argument("--settings", nargs="+", metavar="NAME", help=f"classifier settings (default all): {' '.join(SETTINGS)}")
    g.add_argument("--masker-losses", nargs="+", choices=MASKER_LOSSES, help="masker losses (default both; center always)")
    g = p.add_argument_group("training (defaults: `make demo`'s, which learn at 64 px on synthetic data)")
    g.add_argument("--size", type=int, default=64, help="working size in px of both stages (a multiple of 32)")
    g.add_argument("--epochs", type=int, default=5, help="classifier epochs for WBC_100 (smaller splits get more)")
    g.add_argument("--batch-size", type=int, default=16, help="classifier images per step")
    g.add_argument("--lr", type=float, default=1e-3, help="classifier Adam learning rate")
    g.add_argument("--masker-epochs", type=int, default=15, help="masker epochs for WBC_100's masks")
    g.add_argument("--masker-batch-size", type=int, default=8, help="masker images per step")
    g.add_argument("--masker-lr", type=float, default=2e-3, help="masker Adam learning rate")
    g.add_argument("--pretrain-epochs", type=int, default=2, help="masker epochs on DATA/CAM16's masks first (0: none)")
    g.add_argument("--weights", help="local torchvision resnet34 state dict: ImageNet init of both stages")
    g.add_argument("--pretrained", action="store_true", help="ImageNet init via torchvision's download")
    g.add_argument("--scratch", action="store_true", help="random init even where torchvision's cached weights exist")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ... (training, audit)")
    g = p.add_argument_group("running")
    g.add_argument("--out", required=True, type=Path, help="output folder (results/NAME)")
    g.add_argument("--report-only", action="store_true", help="no training: audit, tables and figures from OUT")
    g.add_argument("--no-figures", action="store_true", help="skip the figures (they need matplotlib)")
    g.add_argument("--keep-optimizer", action="store_true", help="keep finished classifiers' optimizer state (244 -> 85 MB)")
    args = p.parse_args(argv)
    saved = read_json(args.out / "sweep.json") if args.report_only else {}
    for key, default in GRID.items():
        setattr(args, key, getattr(args, key) or saved.get(key, default))
    args.masker_seeds = args.masker_seeds or args.seeds
    args.masker_losses = ["center"] + [x for x in args.masker_losses if x != "center"]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    for bad, why in ((set(args.settings) - set(SETTINGS), f"--settings: unknown name (choose from {' '.join(SETTINGS)})"),
                     (args.confound is not None and not 0 <= args.confound <= 1, "--confound is a probability in [0, 1]"),
                     ((args.synth or args.confound is not None) and args.data, "--synth writes OUT/data; drop --data"),
                     (args.size % 32 or args.size < 32, "--size: the masker's UNet needs a positive multiple of 32"),
                     (sum(map(bool, (args.weights, args.pretrained, args.scratch))) > 1,
                      "--weights, --pretrained and --scratch each set the starting weights: pick one"),
                     (device.split(":")[0] not in ("cpu", "cuda") or (device != "cpu" and not torch.cuda.is_available()),
                      f"--device {args.device}: not available here (cpu, or cuda, cuda:1 ... on a machine with CUDA)")):
        if bad:
            p.error(why)
    args.settings = [s for s in SETTINGS if s in args.settings]   # canonical order for the tables
    args.synth, args.dev = args.synth or args.confound is not None, torch.device(device)
    return args

def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}

def resolve_init(args):
    """(flags for both trainers, words for the report): ImageNet where the weights are at hand."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet34_Weights.IMAGENET1K_V1.url).name
    if args.weights or (not args.scratch and not args.pretrained and cached.is_file()):   # an earlier download
        return ["--weights", str(args.weights or cached)], f"ImageNet (--weights {args.weights or cached})"
    if args.pretrained:
        return ["--pretrained"], "ImageNet (torchvision --pretrained)"
    return [], "from scratch (random init: no --weights, --pretrained or cached torchvision resnet34 weights)"

def ensure_synth(root, scale, size, seed, confound):
    """Write the synthetic dataset once; ROOT/synth.json, written last, marks it complete."""
    want, marker = {"scale": scale, "size": size, "seed": seed, "confound": confound}, Path(root) / "synth.json"
    if marker.is_file() and read_json(marker) != want:
        raise SystemExit(f"{root}: synthesised with {read_json(marker)}, this sweep asks for {want}; use a new --out")
    if not marker.is_file():
        print(f"synthesising {root} with {want}", flush=True)
        write_synth(root, scale=scale, size=size, seed=seed, confound=confound)   # deterministic: a redo overwrites
        save_json(want, marker)
    return want

# ---------------------------------------------------------------------------- the runs and the leakage guard
@functools.lru_cache(maxsize=None)
def sha1_of(path, mtime_ns, size):
    """sha1 of a file's bytes, cached by (path, mtime, size): a sweep hashes each file once."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()

def check_leakage(data_root, split, masks_dir):
    """No WBC_100/val image (by sha1) among WBC_<split>'s training images or masks (ground truth or generated); the
    generated train masks one per WBC_<split> image, by a masker of that split. A JSON-able record with 'ok'."""
    dirs, under = wbc_dirs(data_root, split), lambda f: list_images(f) if Path(f).is_dir() else []
    digest = lambda p: sha1_of(str(p), os.stat(p).st_mtime_ns, os.stat(p).st_size)   # noqa: E731
    val = {digest(p): p for p in under(dirs["val_data"])}
    train, generated = under(dirs["train_data"]), under(Path(masks_dir) / "train")
    in_images, in_masks = ([f"{p} == {val[h]}" for p in files if (h := digest(p)) in val]
                           for files in (train, under(dirs["train_mask"]) + generated))
    want, have = {(p.parent.name, p.stem) for p in train}, {(p.parent.name, p.stem) for p in generated}
    masker_split = read_json(Path(masks_dir).parent / "metrics.json").get("split")
    return {"val_images": len(val), "train_images": len(train), "generated_train_masks": len(generated),
            "val_in_train_images": in_images[:20], "val_in_train_masks": in_masks[:20],
            "generated_not_in_split": sorted("/".join(k) for k in have - want)[:20], "masker_split": masker_split,
            "split_images_without_generated_mask": len(want - have) if generated else None,
            "ok": not (in_images or in_masks or have - want or (generated and want - have) or masker_split not in (None, split))}

def as_flags(**kw):
    """as_flags(batch_size=8, out=p) -> ['--batch-size', '8', '--out', 'p']."""
    return [t for k, v in kw.items() for t in (f"--{k.replace('_', '-')}", str(v))]

def grid_runs(args, root="", init_flags=()):
    """(script, folder, argv) of every run: maskers, then classifiers, seed outermost (a cut-short sweep has whole tables)."""
    pretrain = (["--pretrain-on", str(Path(root, "CAM16")), "--pretrain-epochs", str(args.pretrain_epochs)]
                if args.pretrain_epochs and Path(root, "CAM16", "train", "mask").is_dir() else [])
    runs = []
    for seed, split, loss in itertools.product(args.masker_seeds, args.splits, args.masker_losses):
        out = args.out / "masker" / f"WBC_{split}_{loss}_seed{seed}"
        runs.append(("train_masker.py", out, as_flags(data=root, split=split, size=args.size, loss=loss,
                     epochs=args.masker_epochs, batch_size=args.masker_batch_size, lr=args.masker_lr, seed=seed,
                     device=args.device, out=out) + list(init_flags) + pretrain))
    for seed, split, setting in itertools.product(args.seeds, args.splits, args.settings):
        out = args.out / "classifier" / f"WBC_{split}" / setting / f"seed{seed}"
        masks = args.out / "masker" / f"WBC_{split}_center_seed{args.masker_seeds[0]}" / "masks"
        runs.append(("train_classifier.py", out, as_flags(data=root, split=split, size=args.size, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, seed=seed, masks=masks, device=args.device, out=out)
                     + SETTINGS[setting] + list(init_flags)))
    return runs

def flag_values(argv):
    """['--a', '1', '2', '--b'] -> {'--a': '1 2', '--b': ''}: what a run was asked, in any order."""
    starts = [i for i, t in enumerate(argv) if t.startswith("--")] + [len(argv)]
    return {argv[i]: " ".join(argv[i + 1:j]) for i, j in zip(starts, starts[1:])}

def check_same_args(folder, argv):
    """A finished run made with other arguments would mix silently into the tables: refuse, naming the flags."""
    a, b = flag_values(read_json(Path(folder) / "args.json").get("argv") or argv), flag_values(argv)
    diff = ", ".join(f"{k} {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in sorted(a | b) if a.get(k) != b.get(k))
    if diff:
        raise SystemExit(f"{folder}: finished with other arguments ({diff}); use a new --out or delete that folder")

def execute(runs, args, root):
    """Run each (script, folder, argv) without metrics.json as `python script argv`, output in folder/stdout.log; a
    classifier run is checked for leakage first (a leak: not run), then slimmed and audited. Returns the failures."""
    failures, todo = [], [r for r in runs if not (r[1] / "metrics.json").is_file()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} finished before (skipped), {len(todo)} to run", flush=True)
    for i, (script, folder, argv) in enumerate(todo, 1):
        folder.mkdir(parents=True, exist_ok=True)
        save_json({"script": script, "argv": argv}, folder / "args.json")
        if script == "train_classifier.py":
            leak = check_leakage(root, int(argv[argv.index("--split") + 1]), argv[argv.index("--masks") + 1])
            save_json(leak, folder / "leakage.json")
            if not leak["ok"]:
                print(f"[{i}/{len(todo)}] {folder}: leakage check FAILED, not trained (see leakage.json)", flush=True)
                failures.append((str(folder), "leakage check failed: see leakage.json"))
                continue
        print(f"[{i}/{len(todo)}] {script} -> {folder}", flush=True)
        start = time.perf_counter()
        with open(folder / "stdout.log", "w") as log:   # the trainer's cwd is ours: relative paths hold
            ok = not subprocess.run([sys.executable, str(HERE / script)] + argv, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds, lines = time.perf_counter() - start, (folder / "stdout.log").read_text().splitlines()
        tail = "" if ok else "\n".join(lines[-15:])
        save_json({"script": script, "argv": argv, "ok": ok, "wall_seconds": seconds}, folder / "args.json")
        print(f"[{i}/{len(todo)}] {'done' if ok else 'FAILED'} in {seconds:.0f}s" + (f"\n{tail}" if tail else ""), flush=True)
        if not ok:
            failures.append((str(folder), tail.splitlines()[-1] if tail else "failed"))
        elif script == "train_classifier.py":
            if not args.keep_optimizer:   # only resuming needs the optimizer state (2/3 of the bytes); slim before the audit
                ckpt = {k: v for k, v in load_checkpoint(folder / "checkpoint.pt").items() if k not in ("optimizer", "scheduler")}
                save_checkpoint(ckpt | {"slimmed": True}, folder / "checkpoint.pt")
            audit_all(args.out, args.dev, [folder])   # now, so audits appear as the sweep goes; main() lists failures
    return failures

# ---------------------------------------------------------------------------- shortcut audit
def locate(path, out):
    """The longest tail of a path a run recorded that exists under OUT, else the path: a copied or renamed sweep finds
    its own data and masks (not what now lies at the old place)."""
    tails = (Path(out, *Path(path).parts[i:]) for i in range(int(Path(path).is_absolute()), len(Path(path).parts)))
    return next((t for t in tails if t.exists()), Path(path))

@functools.lru_cache(maxsize=8)
def load_val(root, split, size, classes, generated):
    """WBC_100/val: images (N, 3, S, S) uint8, labels (N,), generated masks (N, 1, S, S) (a channel model's input) or
    None, the masks to blank with (ground truth where complete, else the generated ones) and their name."""
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
    """uint8 images (N, 3, S, S) with only the cell (keep='cell') or the background ('background') left; masks
    (N, 1, S, S) 0/1. Cell-only: the outside gets ONE colour shared by all images (an image's own would carry a
    class-tinted background along). Background-only: the cell, grown a few px, gets the image's mean background."""
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
    """maps (N, C, h, w), classes (N,), masks (N, 1, S, S) -> (N,): the share of the positive map of `classes`,
    upsampled bilinearly to S x S, that lies inside the mask; NaN where that map is nowhere positive."""
    cam = maps[torch.arange(len(maps)), classes].clamp_min(0)[:, None]
    up = F.interpolate(cam, size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    total, inside = up.sum((1, 2)), (up * masks[:, 0].float()).sum((1, 2))
    return torch.where(total > 0, inside / total.clamp_min(1e-12), float("nan"))

def load_run(folder, out, device):
    """(model, checkpoint, mask channel?, load_val's 5-tuple) of a finished classifier run, old or new. The model's
    forward is its forward_map, so data.infer batches logit maps (N, C, S/32, S/32)."""
    ckpt = load_checkpoint(Path(folder) / "checkpoint.pt", ("model", "args", "classes"))
    run, channel = ckpt["args"], ckpt["args"].get("mask_mode") == "channel"   # only keys every version has
    model = ResNetClassifier(len(ckpt["classes"]), 4 if channel else 3)
    model.load_state_dict(ckpt["model"])
    model.forward = model.forward_map
    val = load_val(str(locate(run["data"], out)), run["split"], run["size"], tuple(ckpt["classes"]),
                   str(locate(run["masks"], out)))
    if channel and val[2] is None:
        raise DataError(f"{folder}: a mask-channel model, and {run['masks']}/val lacks masks of val images")
    return model.to(device, memory_format=torch.channels_last), ckpt, channel, val

def logit_maps(model, images, masks, channel, device):
    """(N, C, h, w) float on the CPU; bf16 autocast on CUDA only (a CPU may emulate bf16, slowly)."""
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    return infer(model, images, masks, 64, device, amp, mask_channel=channel)

def audit_run(folder, out, device):
    """Accuracy on full, cell-only and background-only val images, how often a blanked image keeps the full
    image's prediction, and the predicted class's activation share inside the mask. Writes audit.json."""
    model, _, channel, (images, labels, gen_masks, masks, source) = load_run(folder, out, device)
    maps = logit_maps(model, images, gen_masks, channel, device)
    preds = maps.mean((2, 3)).argmax(1)
    cell, back = (logit_maps(model, blank(images, masks, keep), gen_masks, channel, device).mean((2, 3)).argmax(1)
                  for keep in ("cell", "background"))
    acc = lambda a, b: (a == b).float().mean().item()   # noqa: E731
    record = {"version": AUDIT_VERSION, "accuracy": acc(preds, labels), "cell_only_accuracy": acc(cell, labels),
              "background_only_accuracy": acc(back, labels), "cell_only_agreement": acc(cell, preds),
              "background_only_agreement": acc(back, preds), "cam_inside_mask": cam_inside(maps, preds, masks).nanmean().item(),
              "mask_area": masks.float().mean().item(), "logit_map": list(maps.shape[-2:]),
              "classes_predicted": len(set(preds.tolist())), "blank_masks": source, "n": len(labels),
              "preds": preds.tolist(), "cell_only_preds": cell.tolist(), "background_only_preds": back.tolist()}
    save_json(record, Path(folder) / "audit.json")
    return record

def audit_all(out, device, folders=None):
    """Audit the finished classifier runs (all under OUT by default) without a current audit.json; failures listed."""
    failures = []
    for folder in folders or sorted(p.parent for p in Path(out).glob("classifier/WBC_*/*/seed*/metrics.json")):
        audit = folder / "audit.json"
        if read_json(audit).get("version") != AUDIT_VERSION or audit.stat().st_mtime < (folder / "checkpoint.pt").stat().st_mtime:
            try:
                audit_run(folder, out, device)
            except (Exception, SystemExit) as e:   # SystemExit: load_checkpoint's clear errors
                print(f"audit of {folder} failed: {type(e).__name__}: {e}", flush=True)
                failures.append((str(folder), f"audit failed: {type(e).__name__}: {e}"))
    return failures

# ---------------------------------------------------------------------------- small-sample statistics and tables
def mean_std(values):
    """(mean, sample std (NaN below 2 values), n) of the values that are not None or NaN."""
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    mean = sum(v) / len(v) if v else float("nan")
    return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan"), len(v)

def t_cdf(t, df):
    """P(T <= t) of Student's t, integer df >= 1, exact (Abramowitz & Stegun 26.7.3-4): with theta = atan(t / sqrt(df)),
    P(|T| < t) = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 ...)) at odd df, sin (1 + 1/2 cos^2 ...) at even."""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    for k in range(1 + df % 2, df - 1, 2):   # odd df: k = 2, 4 .. df-3; even df: k = 1, 3 .. df-3
        term *= cos2 * k / (k + 1)
        total += term
    inside = (2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0)) if df % 2
              else math.sin(theta) * total)
    return 0.5 + math.copysign(inside / 2, t)

def sign_flip_p(diffs):
    """Exact two-sided permutation p of paired differences: the share of all 2^n sign flips whose |sum| is at
    least the observed one (ties count). Its smallest value is 2 / 2^n: 0.25 at n = 3."""
    if not diffs:
        return float("nan")
    observed = abs(sum(diffs)) - 1e-9 * max(1.0, sum(map(abs, diffs)))   # float sums of a tie differ in the last bits
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed for signs in flips) / len(flips)

def paired(a, b):
    """{seed: value} a vs b over their common seeds: mean and std of a - b, n, two-sided paired t-test p
    (df = n - 1; NaN below 2 seeds; identical differences: 0, or 1 when all are 0) and sign_flip_p."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    mean, std, n = mean_std(diffs)
    p_t = float("nan") if n < 2 else float(mean == 0) if std == 0 else 2 * t_cdf(-abs(mean) * math.sqrt(n) / std, n - 1)
    return {"mean": mean, "std": std, "n": n, "p_t": p_t, "p_perm": sign_flip_p(diffs)}

def comparisons(classifiers, key):
    """Each mask setting minus each CONTROLS setting of its split and balance, paired by seed, on value(run, key)."""
    rows = []
    for (split,), runs in group(classifiers, "split").items():
        per = group(runs, "setting")
        for (setting,), these in per.items():
            suffix = "_balance" if setting.endswith("_balance") else ""
            for control in (c + suffix for c in CONTROLS):
                if setting not in ("nomask" + suffix, control) and (control,) in per:
                    a, b = ({r["seed"]: v for r in rs if (v := value(r, key)) is not None} for rs in (these, per[(control,)]))
                    rows.append({"metric": key, "split": split, "setting": setting, "control": control} | paired(a, b))
    return rows

def collect(out):
    """Every finished run under OUT, each once: (masker rows, classifier rows), plain dicts, in table order."""
    maskers = sorted((read_json(p) | {"seed": int(p.parent.name.rsplit("seed", 1)[1]), "folder": str(p.parent)}
                      for p in Path(out).glob("masker/WBC_*_seed*/metrics.json")),
                     key=lambda r: (-r["split"], r["loss"], r["seed"]))
    classifiers = [read_json(p) | {"seed": int(p.parent.name[4:]), "setting": p.parent.parent.name,
                                   "split": int(p.parents[2].name[4:]), "folder": str(p.parent),
                                   "audit": read_json(p.parent / "audit.json"), "leakage": read_json(p.parent / "leakage.json")}
                   for p in Path(out).glob("classifier/WBC_*/*/seed*/metrics.json")]
    order = {s: i for i, s in enumerate(SETTINGS)}
    return maskers, sorted(classifiers, key=lambda r: (-r["split"], order.get(r["setting"], 99), r["setting"], r["seed"]))

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
# a model that predicts one class keeps its prediction on any input: 'classes predicted' shows it
AUDIT_COLUMNS = tuple((n, k, 100, 1) for n, k in (
    ("val acc %", "accuracy"), ("cell-only acc %", "cell_only_accuracy"), ("background-only acc %", "background_only_accuracy"),
    ("cell-only keeps pred %", "cell_only_agreement"), ("background-only keeps pred %", "background_only_agreement"),
    ("CAM share in mask %", "cam_inside_mask"), ("mask area %", "mask_area")))
AUDIT_COLUMNS += (("classes predicted", "classes_predicted", 1, 1),)
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

def report(args, maskers, classifiers, missing, figures):
    """results.md (set-up, missing runs, every table) and results.json; returns the markdown."""
    out, cfg, first = args.out, {"masker_seeds": ["?"]} | read_json(args.out / "sweep.json"), (classifiers or [{}])[0]
    stats = [row for key, _ in PAIRED_METRICS for row in comparisons(classifiers, key)]
    audited = next((r["audit"] for r in classifiers if r["audit"]), {})
    leaks = [r["folder"] for r in classifiers if r["leakage"] and not r["leakage"].get("ok")]
    per_class = [(f"{c} (n={n}) error %", ("per_class_error", c), 100, 1) for c, n in first.get("support", {}).items()]
    text = "\n".join([
        f"# Sweep results: {out}", "",
        f"- data {cfg.get('data')}" + (f" (synthetic {cfg['synth']})" if cfg.get("synth") else "") + f"; init {cfg.get('init')}",
        f"- {cfg.get('size')} px; WBC_100 epochs (scaled up for smaller splits): classifier {cfg.get('epochs')}, masker "
        f"{cfg.get('masker_epochs')} + {cfg.get('pretrain_epochs')} on CAM16; masks of masker seed {cfg['masker_seeds'][0]}",
        f"- finished: {len(maskers)} masker, {len(classifiers)} classifier runs; majority baseline on val "
        + ", ".join(sorted({f"{100 * r['majority_baseline']:.1f}%" for r in classifiers})),
        f"- missing from the grid: {len(missing)}" + "".join(f"\n  - {m}" for m in missing),
        f"- leakage guard: {sum(bool(r['leakage']) for r in classifiers)} of {len(classifiers)} classifier runs checked, "
        f"{len(leaks)} failed" + (": " + ", ".join(leaks) if leaks else ""), "",
        "## Masker (stage 1), held out = WBC_100/val/mask", "", mean_table(maskers, "loss", MASKER_COLUMNS), "",
        "## Classifier (stage 2) on WBC_100/val, mean ± sample std over seeds", "",
        mean_table(classifiers, "setting", CLASSIFIER_COLUMNS), "",
        "## Mask settings vs the controls, paired by seed", "",
        "Each setting minus `nomask` and minus `alpha0_1` (the clean control: the same per-location loss, uniform weights), "
        "same seed and balance, in points. p (paired t): two-sided, df = n - 1, assumes normal differences (n seeds cannot "
        "check that). p (sign-flip): exact, two-sided, over all 2^n sign flips of the differences; the smallest it can be "
        "is 2/2^n, so at n = 3 it is at least 0.25 and no difference can reach p < 0.05 by it.", "", paired_tables(stats), "",
        "## Class balance: per-class error, each setting next to its --balance twin", "",
        mean_table(classifiers, "setting", per_class + [("weighted mean error %", "weighted_mean_error", 100, 1),
                                                        ("std over classes", "per_class_error_std", 100, 1)]), "",
        "## Shortcut audit", "",
        f"Blanked with the {audited.get('blank_masks')} masks: cell-only = outside painted one shared background colour, "
        "background-only = the cell (grown a few px) painted the image's mean background; 'keeps pred': the blanked image "
        "gets the full image's prediction. CAM share: of the predicted class's positive logit map (upsampled from "
        f"{audited.get('logit_map')}: coarse at small sizes) inside the mask; a uniform map scores the mask area.", "",
        mean_table(classifiers, "setting", AUDIT_COLUMNS), ""]
        + (["## Figures", ""] + [f"- [{Path(f).name}]({Path(f).relative_to(out)})" for f in figures] + [""] if figures else []))
    atomic_write(out / "results.md", lambda f: f.write(text.encode()))
    summary = [{"split": split, "setting": setting} | {k: dict(zip(("mean", "std", "n"), mean_std([r[k] for r in rs])))
                                                      for k in ("accuracy", "balanced_accuracy")}
               for (split, setting), rs in group(classifiers, "split", "setting").items()]
    save_json({"config": cfg, "missing": missing, "maskers": maskers, "stats": {"summary": summary, "paired": stats},
               "classifiers": [r | {"audit": {k: v for k, v in r["audit"].items() if not k.endswith("preds")}}
                               for r in classifiers]}, out / "results.json")
    return text

# ---------------------------------------------------------------------------- figures (matplotlib, optional)
def save_figure(plt, fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)

def plot_curves(plt, folder):
    """train/val loss (log scale: an early val loss can be 1000x the last) and accuracy by epoch from log.csv."""
    with open(Path(folder) / "log.csv") as f:
        rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for key, ax in zip(("loss", "acc"), axes):
        for part in ("train", "val"):
            ax.plot([int(r["epoch"]) for r in rows], [float(r[f"{part}_{key}"]) for r in rows], marker="o", label=part)
        ax.set(xlabel="epoch", ylabel=key, yscale="log" if key == "loss" else "linear")
        ax.legend()
    fig.suptitle(str(Path(*Path(folder).parts[-3:])), fontsize=9)
    return save_figure(plt, fig, Path(folder) / "curves.png")

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
        points = sorted((split, *mean_std([r["accuracy"] for r in rs])[:2]) for (split,), rs in group(runs, "split").items())
        ax.errorbar([p[0] for p in points], [100 * p[1] for p in points], marker="o", capsize=3, label=setting,
                    yerr=[0 if math.isnan(p[2]) else 100 * p[2] for p in points])
    ax.axhline(100 * classifiers[0]["majority_baseline"], color="grey", linestyle="--", label="majority")
    splits = sorted({r["split"] for r in classifiers})
    ax.set(xscale="log", xticks=splits, xticklabels=map(str, splits), xlabel="training data (% of WBC_100)",
           ylabel="val accuracy %")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)

def overlay(ax, image, mask, title, heat=None):
    """One panel: image (3, S, S) uint8, an optional heat map (S, S) in [0, 1] on top, the mask's outline."""
    ax.imshow(image.permute(1, 2, 0).numpy())
    if heat is not None:
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if 0 < mask.sum() < mask.numel():   # an empty or full mask has no outline to draw
        ax.contour(mask[0].float().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
    ax.set_title(title, fontsize=7)
    ax.axis("off")

def plot_examples(plt, folder, fig_dir, name, out, device, per_class=2, limit=10):
    """Of one run: its misclassified val cells (audit.json's predictions, true -> predicted), and the true class's
    activation (positive logit map, upsampled, scaled to its maximum) over a few val cells of each class."""
    model, ckpt, channel, (images, labels, gen_masks, masks, _) = load_run(folder, out, device)
    classes, figs = [c[:4] for c in ckpt["classes"]], []
    preds = torch.tensor(read_json(Path(folder) / "audit.json").get("preds", labels.tolist()))
    wrong = (preds != labels).nonzero()[:, 0][:limit].tolist()
    if wrong:
        fig, axes = plt.subplots(1, len(wrong), figsize=(1.4 * len(wrong), 1.8), squeeze=False)
        for ax, i in zip(axes[0], wrong):
            overlay(ax, images[i], masks[i], f"{classes[labels[i]]}->{classes[preds[i]]}")
        fig.suptitle(f"misclassified ({len(wrong)} shown): {folder}", fontsize=8)
        figs.append(save_figure(plt, fig, fig_dir / f"misclassified_{name}.png"))
    pick = torch.cat([(labels == c).nonzero()[:per_class, 0] for c in range(len(classes))])
    maps = logit_maps(model, images[pick], None if gen_masks is None else gen_masks[pick], channel, device)
    up = F.interpolate(maps[torch.arange(len(pick)), labels[pick]].clamp_min(0)[:, None], size=images.shape[-2:],
                       mode="bilinear", align_corners=False)[:, 0]
    up = up / up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    fig, axes = plt.subplots(2, len(pick), figsize=(1.4 * len(pick), 3.2), squeeze=False)
    for j, i in enumerate(pick.tolist()):
        overlay(axes[0, j], images[i], masks[i], f"{classes[labels[i]]} (pred {classes[maps[j].mean((1, 2)).argmax()]})")
        overlay(axes[1, j], images[i], masks[i], f"map {tuple(maps.shape[-2:])}", heat=up[j])
    fig.suptitle(f"true-class activation: {folder}", fontsize=8)
    return figs + [save_figure(plt, fig, fig_dir / f"cam_{name}.png")]

def make_figures(out, classifiers, device):
    """Every figure ([] without matplotlib); a run whose data cannot be read loses its examples, not the report."""
    try:
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")   # files only, no display
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib; then sweep.py --out OUT --report-only)")
        return []
    fig_dir = Path(out) / "figures"
    figs = [plot_accuracy_vs_split(plt, classifiers, fig_dir / "accuracy_vs_split.png")] if classifiers else []
    for r in classifiers:
        png, log = Path(r["folder"]) / "curves.png", Path(r["folder"]) / "log.csv"
        if log.is_file() and (not png.is_file() or png.stat().st_mtime < log.stat().st_mtime):
            plot_curves(plt, r["folder"])
    for (split, setting), runs in group(classifiers, "split", "setting").items():
        name, first = f"WBC_{split}_{setting}", min(runs, key=lambda r: r["seed"])["folder"]   # one seed to look at
        figs.append(plot_confusion(plt, runs, fig_dir / f"confusion_{name}.png", f"{name}, summed over {len(runs)} seed(s)"))
        try:
            figs += plot_examples(plt, first, fig_dir, name, out, device)
        except (Exception, SystemExit) as e:
            print(f"misclassified and CAM figures of {first} skipped: {type(e).__name__}: {e}")
    return figs

# ---------------------------------------------------------------------------- main
def train_everything(args):
    """Synthesise the data if asked, record OUT/sweep.json, run every unfinished run; returns the failures."""
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.out / "data" if args.synth else Path(args.data or "data")
    synth = ensure_synth(root, args.synth_scale, args.synth_size, args.synth_seed, args.confound or 0.0) if args.synth else None
    for split in args.splits:
        wbc_dirs(root, split)   # a wrong layout fails before any training
    init_flags, init_words = resolve_init(args)
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "dev"}
    save_json(cfg | {"data": str(root), "synth": synth, "init": init_words}, args.out / "sweep.json")
    runs = grid_runs(args, root, init_flags)
    for _, folder, argv in runs:   # before any training: a finished run with other arguments stops the sweep
        if (folder / "metrics.json").is_file():
            check_same_args(folder, argv)
    return execute(runs, args, root)

def main(argv=None):
    args = parse_args(argv)
    failures = ([] if args.report_only else train_everything(args)) + audit_all(args.out, args.dev)
    maskers, classifiers = collect(args.out)
    missing = [str(f.relative_to(args.out)) for _, f, _ in grid_runs(args) if not (f / "metrics.json").is_file()]
    figures = [] if args.no_figures else make_figures(args.out, classifiers, args.dev)
    print(report(args, maskers, classifiers, missing, figures))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}; {len(missing)} run(s) of the grid missing")
    if failures:
        print(f"{len(failures)} run(s) failed:\n" + "\n".join(f"  {f}: {why}" for f, why in failures))
    return {"maskers": maskers, "classifiers": classifiers, "missing": missing, "failures": failures, "figures": figures}

if __name__ == "__main__":
    try:
        sys.exit(1 if main()["failures"] else 0)
    except DataError as e:
        sys.exit(f"error: {e}")
