"""The report's experiments: train_masker.py and train_classifier.py over splits x settings x
seeds, each run a subprocess (fresh memory; a crash fails that run only), then
sweep_report.py OUT: audit, statistics, tables, figures.

    python sweep.py --data data --splits 100 10 --seeds 0 1 2 --epochs 7 --out results/demo
    python sweep.py --confound 0.9 --out results/confound     # synthetic data, tint confounded
    python sweep.py ... --devices cuda:0 cuda:1 --jobs-per-device 2  # 4 at once, maskers first

Runs: OUT/masker/WBC_<split>_<loss>_seed<k>/, OUT/classifier/WBC_<split>/<setting>/seed<k>/
(on the first masker seed's center-loss masks); one with a metrics.json is skipped.
--shard I/N takes run k of the grid when k % N == I (no report); a classifier whose masker is
unfinished fails: run --stage masker on all shards, then --stage classifier, then --report-only.
Shards with --synth: first run `sweep.py ARGS --list` once (it synthesises OUT/data) or use
--data. A second sweep on OUT is refused (shards of one N share it); a run whose trainer still
runs is left alone. SIGTERM, SIGHUP or Ctrl-C stop the running trainers, wait for them, and a
rerun goes on.
"""
import argparse
import fcntl
import functools
import hashlib
import itertools
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from data import (DataError, decode_all, find_leaks, list_images, load_checkpoint, mask_root,
                  save_checkpoint, save_json, wbc_dirs)
from synth import write_synth

# train_classifier.py's flags of each mask setting, under the names the trainer gives them
BASE_SETTINGS = {
    "nomask": [],
    "alpha0_1": ["--alpha", "0", "1"],
    "alpha1_0": ["--alpha", "1", "0"],
    "alpha-1_1": ["--alpha", "-1", "1"],
    "channel": ["--mask-mode", "channel"],
    "input": ["--mask-mode", "input"],   # the background blanked: the model sees the cell
    "crop": ["--mask-mode", "crop"],     # the cell's square, at --size
    "nomask_rrr0.01": ["--rrr", "0.01"],   # the input gradient penalised outside the mask
}
# each setting as is, then with --balance
SETTINGS = {name + suffix: flags + extra for name, flags in BASE_SETTINGS.items()
            for suffix, extra in (("", []), ("_balance", ["--balance"]))}
MASKER_LOSSES = ("center", "bce")
HERE = Path(__file__).resolve().parent
GRID = {   # the grid flags' defaults (None: --masker-seeds follows --seeds)
    "splits": [100, 10],
    "seeds": [0, 1, 2],
    "masker_seeds": None,
    # the report's settings; the guidance ones (input, crop, nomask_rrr0.01) when asked for
    "settings": [name for name in SETTINGS
                 if not name.startswith(("input", "crop")) and "_rrr" not in name],
    "masker_losses": MASKER_LOSSES,
}
CACHE = ".cache/decoded"   # the trainers' default decode cache: the leakage guard shares it
STILL_RUNNING = "still running in another process (its folder is locked); rerun later"
LOCKS = []          # this sweep's locks on OUT (open files): held until main() returns
CHILDREN = set()    # the trainers running now, stopped with the sweep
STOP = threading.Event()   # set by SIGTERM, SIGHUP or SIGINT: no new run starts
STOP.signal_name = None    # which one
# flags that say how this process runs, not what the results are: left out of sweep.json
NOT_RECORDED = {"shard", "sharded", "stage", "list", "devices", "jobs_per_device", "report_only",
                "no_figures"}

def make_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p.add_argument_group("data"))
    add_grid_flags(p.add_argument_group(
        "grid (with --report-only, a flag left out is read from OUT/sweep.json)"))
    add_training_flags(p.add_argument_group(
        "training (defaults: `make demo`'s, which learn at 64 px on synthetic data)"))
    add_running_flags(p.add_argument_group("running"))
    return p

def add_data_flags(g):
    g.add_argument("--data", help="dataset root: ROOT/WBC_<split>/train, ROOT/WBC_100/val "
                                  "(not with --synth)")
    g.add_argument("--synth", action="store_true",
                   help="synthesise the dataset into OUT/data first (once)")
    g.add_argument("--confound", type=float,
                   help="(implies --synth) P(train tint follows the class)")
    g.add_argument("--synth-scale", type=float, default=0.1,
                   help="synthetic dataset size, fraction of the real one")
    g.add_argument("--synth-size", type=int, default=128, help="side of the synthetic images in px")
    g.add_argument("--synth-seed", type=int, default=0, help="seed of the synthetic dataset")

def add_grid_flags(g):
    g.add_argument("--splits", type=int, nargs="+",
                   help="WBC_<split> training sets (default 100 10)")
    g.add_argument("--seeds", type=int, nargs="+", help="classifier seeds (default 0 1 2)")
    g.add_argument("--masker-seeds", type=int, nargs="+", help="masker seeds (default --seeds)")
    g.add_argument("--settings", nargs="+", choices=SETTINGS, metavar="NAME",
                   help=f"default all: {' '.join(SETTINGS)}")
    g.add_argument("--masker-losses", nargs="+", choices=MASKER_LOSSES,
                   help="default both; center always")

def add_training_flags(g):
    g.add_argument("--size", type=int, default=64,
                   help="working size in px of both stages (a multiple of 32)")
    g.add_argument("--epochs", type=int, default=5,
                   help="classifier epochs for WBC_100 (smaller splits get more)")
    g.add_argument("--batch-size", type=int, default=16, help="classifier images per step")
    g.add_argument("--lr", type=float, default=1e-3, help="classifier Adam learning rate")
    g.add_argument("--masker-epochs", type=int, default=15,
                   help="masker epochs for WBC_100's masks")
    g.add_argument("--masker-batch-size", type=int, default=8, help="masker images per step")
    g.add_argument("--masker-lr", type=float, default=2e-3, help="masker Adam learning rate")
    g.add_argument("--pretrain-epochs", type=int, default=2,
                   help="masker epochs on DATA/CAM16's masks first (0: none)")
    g.add_argument("--weights",
                   help="local torchvision resnet34 state dict: ImageNet init of both stages")
    g.add_argument("--pretrained", action="store_true",
                   help="ImageNet init via torchvision (default: random)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1 ... (training, audit)")

def add_running_flags(g):
    g.add_argument("--out", required=True, type=Path, help="output folder (results/NAME)")
    g.add_argument("--report-only", action="store_true",
                   help="no training: sweep_report.py's audit, tables, figures")
    g.add_argument("--no-figures", action="store_true",
                   help="skip the figures (they need matplotlib)")
    g.add_argument("--keep-optimizer", action="store_true",
                   help="keep classifiers' optimizer state (244 -> 85 MB)")
    g.add_argument("--shard", metavar="I/N",
                   help="only runs k with k %% N == I of the grid (I = 0 .. N-1); no report")
    g.add_argument("--stage", default="all", choices=("masker", "classifier", "all"),
                   help="only these runs")
    g.add_argument("--list", action="store_true",
                   help="print a shell command per unfinished run (of --shard, --stage)")
    g.add_argument("--devices", nargs="+", metavar="DEV",
                   help="run on these devices at once (default: --device)")
    g.add_argument("--jobs-per-device", type=int, default=1, metavar="K",
                   help="runs at once on each of --devices")

def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    fill_grid(p, args)
    check_args(p, args)
    args.settings = [s for s in SETTINGS if s in args.settings]   # canonical order for the tables
    if args.confound is not None:
        args.synth = True
    args.sharded = bool(args.shard)
    args.shard = parse_shard(args.shard or "0/1")
    return args

def check_args(p, args):
    """One rule per check, so the user reads which one failed."""
    if args.confound is not None and not 0 <= args.confound <= 1:
        p.error("--confound: a probability")
    if (args.synth or args.confound is not None) and args.data:
        p.error("--synth writes OUT/data; drop --data")
    if args.size % 32 or args.size < 32:
        p.error("--size: the masker's UNet needs a positive multiple of 32")
    if args.weights and args.pretrained:
        p.error("--weights and --pretrained both set the starting weights")
    wanted = [args.device] + (args.devices or [])
    unavailable = [d for d in wanted if not is_here(d)]
    if unavailable:
        p.error(f"--device(s) {' '.join(unavailable)}: not here")
    if parse_shard(args.shard or "0/1") is None:
        p.error(f"--shard {args.shard}: I/N, 0 <= I < N")
    if args.jobs_per_device < 1:
        p.error("--jobs-per-device: at least 1")

def is_here(device):
    """auto and cpu always are; cuda or cuda:K where CUDA is (the index is not checked)."""
    if device in ("auto", "cpu"):
        return True
    return device.split(":")[0] == "cuda" and torch.cuda.is_available()

def parse_shard(text):
    """'I/N' -> (I, N); None unless both are integers with 0 <= I < N."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit()):   # isdigit: '-1' is refused too
        return None
    if int(i) >= int(n):
        return None
    return int(i), int(n)

def fill_grid(p, args):
    """The grid flags left out: from OUT/sweep.json with --report-only (refused unless a sweep's),
    else GRID's defaults; each value once."""
    saved = {}
    if args.report_only:
        saved, why = read_sweep_json(args.out / "sweep.json")
        if why:
            p.error(f"--report-only: {why}")
    for key, default in GRID.items():
        setattr(args, key, getattr(args, key) or saved.get(key, default))
    args.masker_seeds = args.masker_seeds or args.seeds
    args.masker_losses = ["center"] + [x for x in args.masker_losses if x != "center"]
    for key in ("splits", "seeds", "masker_seeds", "masker_losses"):   # --seeds 0 0: one run
        setattr(args, key, list(dict.fromkeys(getattr(args, key))))

def read_json(path):
    """A JSON file's content, {} if it is absent."""
    if not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())

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

def ensure_synth(root, scale, size, seed, confound):
    """Write the synthetic dataset once; ROOT/synth.json, written last, marks it complete (no
    lock: see the top)."""
    want = {"scale": scale, "size": size, "seed": seed, "confound": confound}
    marker = Path(root) / "synth.json"
    if marker.is_file() and read_json(marker) != want:
        raise SystemExit(f"{root}: synthesised with {read_json(marker)}, this sweep asks for "
                         f"{want}; use a new --out")
    if not marker.is_file():
        # stderr: --list's stdout is commands
        print(f"synthesising {root} with {want}", file=sys.stderr, flush=True)
        # deterministic: a redo after a crash overwrites the same files
        write_synth(root, scale=scale, size=size, seed=seed, confound=confound)
        save_json(want, marker)
    return want

@functools.lru_cache(maxsize=None)   # by (path, mtime, size): a sweep hashes each file once
def sha1_of(path, mtime_ns, size):
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()

def digest(path):
    """sha1 of a file's bytes, cached until the file changes."""
    stat = os.stat(path)
    return sha1_of(str(path), stat.st_mtime_ns, stat.st_size)

def quiet(*_):
    """decode_all's log, silenced: the sweep prints its own progress."""

def decoded_leaks(val_paths, train_paths, size):
    """['train == val'] of the training images with a val image's pixels at `size`."""
    val, _, val_bad = decode_all("image", val_paths, size, CACHE, quiet)
    train, _, train_bad = decode_all("image", train_paths, size, CACHE, quiet)
    # unreadable ones decode to zeros: they would all match each other
    val_keep = [i for i in range(len(val_paths)) if i not in val_bad]
    train_keep = [i for i in range(len(train_paths)) if i not in train_bad]
    pairs = find_leaks(val[val_keep], [val_paths[i] for i in val_keep],
                       train[train_keep], [train_paths[i] for i in train_keep])
    return [f"{t} == {v}" for t, v in pairs]

def check_leakage(data_root, split, masks_dir, size=64):
    """A record with 'ok': no val image (its pixels at `size`) in WBC_<split>'s train images or
    in the masker's --pretrain-on images, no val image file (sha1) among the masks; its own
    masker's masks."""
    dirs = wbc_dirs(data_root, split)   # list_images: any depth; a missing folder holds none
    val_paths = list_images(dirs["val_data"])
    val = {digest(p): p for p in val_paths}
    train = list_images(dirs["train_data"])
    generated = list_images(Path(masks_dir) / "train")
    masker = read_json(Path(masks_dir).parent / "metrics.json")
    pretrain_roots = masker.get("pretrain_on") or []
    pretrain = [p for r in pretrain_roots for p in list_images(mask_root(r, data_root)[0])]
    in_images = decoded_leaks(val_paths, train, size)
    in_pretrain = decoded_leaks(val_paths, pretrain, size)
    masks = list_images(dirs["train_mask"]) + generated
    in_masks = [f"{p} == {val[digest(p)]}" for p in masks if digest(p) in val]
    want = {(p.parent.name, p.stem) for p in train}       # (class, name) of each image
    have = {(p.parent.name, p.stem) for p in generated}   # ... and of each generated mask
    masker_split = masker.get("split")
    leaked = bool(in_images or in_masks or in_pretrain)
    foreign = bool(have - want)   # masks of images not in this split: another split's masker
    incomplete = bool(generated) and bool(want - have)
    wrong_split = masker_split not in (None, split)
    return {
        "ok": not (leaked or foreign or incomplete or wrong_split),
        "val_images": len(val),
        "train_images": len(train),
        "generated_train_masks": len(generated),
        "val_in_train_images": in_images[:20],
        "val_in_train_masks": in_masks[:20],
        "masker_split": masker_split,
        "val_in_pretrain_images": in_pretrain[:20],
        "pretrain_images": len(pretrain),
        "generated_not_in_split": sorted("/".join(k) for k in have - want)[:20],
        "split_images_without_generated_mask": len(want - have) if generated else None,
    }

def hold(path, shared):
    """flock `path` (shared: beside other shared holders; else alone) until release_locks();
    False if taken."""
    lock = open(path, "a")
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(lock, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return False
    LOCKS.append(lock)
    return True

def release_locks():
    while LOCKS:
        LOCKS.pop().close()

def is_live(folder):
    """True while a trainer holds `folder` (data.claim_folder's lock; the OS drops a dead one's)."""
    if not (Path(folder) / ".lock").is_file():
        return False
    with open(Path(folder) / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False

def lock_out(args):
    """Refuse a second sweep on OUT before touching it: a sweep without --shard (or
    --report-only) runs alone; shards share OUT, each I/N once, one N at a time (their grids
    would overlap)."""
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot make it ({e.strerror or e})") from None
    busy = f"{out}: another sweep is running on it; wait for it to end or use another --out"
    if not args.sharded or args.report_only:
        if not hold(out / ".lock", shared=False):
            raise DataError(busy)
        return None
    i, n = args.shard
    if not hold(out / ".lock", shared=True):
        raise DataError(busy)
    if not hold(out / f".lock-of-{n}", shared=True):
        raise DataError(busy)
    if not hold(out / f".lock-shard-{i}-of-{n}", shared=False):
        raise DataError(f"--shard {i}/{n}: already running on {out}; wait for it to end")
    for other in out.glob(".lock-of-*"):   # taken alone: no shard of that N runs
        if other.name == f".lock-of-{n}":
            continue
        if not hold(other, shared=False):
            raise DataError(f"--shard {i}/{n}: shards of another count ({other.name[9:]}) are "
                            f"running on {out}; run every shard with the same N")
        LOCKS.pop().close()   # nobody there: let it go at once
    return None

def stop_children(signum, frame):
    """SIGTERM, SIGHUP, SIGINT: no new run starts, each running trainer gets SIGTERM; main waits."""
    STOP.set()
    STOP.signal_name = signal.Signals(signum).name
    for child in list(CHILDREN):
        child.send_signal(signal.SIGTERM)

def as_flags(**kw):
    """as_flags(batch_size=8, out=p) -> ['--batch-size', '8', '--out', 'p']."""
    return [t for k, v in kw.items() for t in (f"--{k.replace('_', '-')}", str(v))]

def pretrain_flags(args, root):
    """The maskers' --pretrain-on ROOT/CAM16, where it has masks and --pretrain-epochs > 0."""
    cam16 = Path(root, "CAM16")
    if not args.pretrain_epochs:
        return []
    if not (cam16 / "train" / "mask").is_dir():
        return []
    return ["--pretrain-on", str(cam16), "--pretrain-epochs", str(args.pretrain_epochs)]

def masker_runs(args, root, init_flags):
    """(script, folder, argv) of each masker, seed outermost."""
    pretrain = pretrain_flags(args, root)
    runs = []
    for seed, split, loss in itertools.product(args.masker_seeds, args.splits, args.masker_losses):
        out = args.out / "masker" / f"WBC_{split}_{loss}_seed{seed}"
        flags = as_flags(data=root, split=split, size=args.size, loss=loss,
                         epochs=args.masker_epochs, batch_size=args.masker_batch_size,
                         lr=args.masker_lr, seed=seed, device=args.device, out=out)
        runs.append(("train_masker.py", out, flags + list(init_flags) + pretrain))
    return runs

def classifier_runs(args, root, init_flags):
    """(script, folder, argv) of each classifier, seed outermost, on the first masker seed's
    center-loss masks of its split."""
    runs = []
    for seed, split, setting in itertools.product(args.seeds, args.splits, args.settings):
        out = args.out / "classifier" / f"WBC_{split}" / setting / f"seed{seed}"
        masker = args.out / "masker" / f"WBC_{split}_center_seed{args.masker_seeds[0]}"
        flags = as_flags(data=root, split=split, size=args.size, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=seed,
                         masks=masker / "masks", device=args.device, out=out)
        runs.append(("train_classifier.py", out, flags + SETTINGS[setting] + list(init_flags)))
    return runs

def grid_runs(args, root="", init_flags=()):
    """(script, folder, argv) of every run: maskers, then classifiers, seed outermost; this
    order decides the shards."""
    return masker_runs(args, root, init_flags) + classifier_runs(args, root, init_flags)

def shard_of(runs, n):
    """{folder: the shard (0 .. n-1) that trains it}: by place in grid_runs' order, so the same
    on every machine."""
    return {folder: k % n for k, (_, folder, _) in enumerate(runs)}

def flag_value(argv, flag):
    return argv[argv.index(flag) + 1]

def with_device(argv, device):
    """argv with the value of --device replaced by `device`."""
    out = list(argv)
    for k in range(1, len(argv)):
        if argv[k - 1] == "--device":
            out[k] = device
    return out

def why_not_yet(argv, folder, args, root, owner):
    """Why a classifier may not train now (its masker unfinished, or a leak), else None; writes
    its leakage.json."""
    masker = Path(flag_value(argv, "--masks")).parent
    if not (masker / "metrics.json").is_file():
        return (f"masker {masker} not finished yet (owned by shard {owner[masker]}/"
                f"{args.shard[1]}); rerun later")
    split = int(flag_value(argv, "--split"))
    size = int(flag_value(argv, "--size"))
    leak = check_leakage(root, split, masker / "masks", size)
    save_json(leak, folder / "leakage.json")
    if not leak["ok"]:
        return "leakage check FAILED, not trained: see leakage.json"
    return None

def slim_checkpoint(path):
    """Drop the optimizer and scheduler: only resuming needs them (2/3 of the bytes)."""
    ckpt = load_checkpoint(path)
    slim = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler")}
    save_checkpoint(slim | {"slimmed": True}, path)

def run_one(script, folder, argv, device, args, root, owner, tag):
    """`python script argv` on `device` (a classifier after its masker and the leakage check);
    None or (folder, why)."""
    argv = with_device(argv, device)
    if is_live(folder):   # a trainer left by a killed sweep: not ours to restart or to mark failed
        print(f"{tag} {folder}: {STILL_RUNNING}", flush=True)
        return str(folder), STILL_RUNNING
    folder.mkdir(parents=True, exist_ok=True)
    save_json({"script": script, "argv": argv}, folder / "args.json")
    if script == "train_classifier.py":
        why = why_not_yet(argv, folder, args, root, owner)
        if why:
            print(f"{tag} {folder}: {why}", flush=True)
            return str(folder), why
    print(f"{tag} {script} on {device} -> {folder}", flush=True)
    started = time.perf_counter()
    ok = train(script, argv, folder) == 0
    seconds = time.perf_counter() - started
    if not ok and STOP.is_set():   # stopped, not failed: a rerun goes on with it
        record = {"script": script, "argv": argv, "stopped": STOP.signal_name}
        save_json(record, folder / "args.json")
        print(f"{tag} stopped by {STOP.signal_name} after {seconds:.0f}s: {folder}", flush=True)
        return str(folder), f"stopped by {STOP.signal_name}; rerun the sweep to train it"
    if not ok and is_live(folder):   # another sweep's trainer took the folder first: it goes on
        return str(folder), STILL_RUNNING
    record = {"script": script, "argv": argv, "ok": ok, "wall_seconds": seconds}
    save_json(record, folder / "args.json")
    if not ok:
        tail = "\n".join((folder / "stdout.log").read_text().splitlines()[-15:])
        message = f"{tag} FAILED in {seconds:.0f}s: {folder}"
        if tail:
            message += f"\n{tail}"
        print(message, flush=True)
        return str(folder), tail.splitlines()[-1] if tail else "failed"
    print(f"{tag} done in {seconds:.0f}s: {folder}", flush=True)
    if script == "train_classifier.py" and not args.keep_optimizer:
        slim_checkpoint(folder / "checkpoint.pt")
    return None

def train(script, argv, folder):
    """Run the trainer, known to stop_children while it runs; its exit status."""
    with open(folder / "stdout.log", "w") as log:   # the trainer's cwd is ours: relative paths hold
        cmd = [sys.executable, str(HERE / script), *argv]
        child = subprocess.Popen(cmd, stdout=log, stderr=log)
        CHILDREN.add(child)
        if STOP.is_set():   # the signal came between the check and the add
            child.send_signal(signal.SIGTERM)
        code = child.wait()
        CHILDREN.discard(child)
    return code

def execute(todo, args, root, owner):
    """The maskers of `todo`, then the classifiers, --jobs-per-device at once on each of
    --devices; the failures."""
    slots = queue.Queue()   # the free devices: a run takes one and puts it back
    for device in (args.devices or [args.device]) * args.jobs_per_device:
        slots.put(device)
    count = itertools.count(1)

    def on_a_free_device(run):
        device = slots.get()
        if STOP.is_set():
            slots.put(device)
            return str(run[1]), f"not started: the sweep was stopped by {STOP.signal_name}"
        try:
            return run_one(*run, device, args, root, owner, f"[{next(count)}/{len(todo)}]")
        finally:
            slots.put(device)

    failures = []
    with ThreadPoolExecutor(slots.qsize()) as pool:
        for stage in ("train_masker.py", "train_classifier.py"):
            # list(): the classifiers' map starts once every masker has returned
            results = list(pool.map(on_a_free_device, [r for r in todo if r[0] == stage]))
            failures += [f for f in results if f]
    return failures

def data_root(args):
    if args.synth:
        return args.out / "data"
    return Path(args.data or "data")

def init_flags(args):
    """The trainers' ImageNet init: --weights FILE, --pretrained, or none (random)."""
    if args.weights:
        return ["--weights", args.weights]
    if args.pretrained:
        return ["--pretrained"]
    return []

def sweep_record(args, root, synth, init, runs):
    """OUT/sweep.json: the flags that shape the results, the data, the init, the grid's runs."""
    recorded = {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in recorded.items()}   # JSON: no Path
    cfg["data"] = str(root)
    cfg["synth"] = synth
    cfg["init"] = f"ImageNet ({' '.join(init)})" if init else "from scratch"
    cfg["runs"] = [str(f.relative_to(args.out)) for _, f, _ in runs]
    return cfg

def stage_of(script):
    """'train_masker.py' -> 'masker'."""
    return script[len("train_"):-len(".py")]

def train_everything(args):
    """Data, OUT/sweep.json, then run (--list: print) this shard's unfinished runs of --stage;
    the failures."""
    root = data_root(args)
    synth = None
    if args.synth:
        synth = ensure_synth(root, args.synth_scale, args.synth_size, args.synth_seed,
                             args.confound or 0.0)
    for split in args.splits:
        wbc_dirs(root, split)   # a wrong layout fails before any training
    init = init_flags(args)
    runs = grid_runs(args, root, init)
    i, n = args.shard
    cfg = sweep_record(args, root, synth, init, runs)
    if read_json(args.out / "sweep.json") != cfg:   # N shards start at once: one write is enough
        save_json(cfg, args.out / "sweep.json")
    owner = shard_of(runs, n)
    mine = [r for r in runs if owner[r[1]] == i and args.stage in ("all", stage_of(r[0]))]
    todo = [r for r in mine if not (r[1] / "metrics.json").is_file()]
    if args.list:
        for script, _, argv in todo:
            print(shlex.join(["python", os.path.relpath(HERE / script)] + argv))
        return []
    print(f"{len(mine)} runs (shard {i}/{n}, stage {args.stage}): {len(todo)} to run, "
          f"the rest finished", flush=True)
    return execute(todo, args, root, owner)

def main(argv=None):
    """Lock OUT, train, then (not with --shard or --list) sweep_report.py: {'failures':
    [(folder, why)], 'report': its status}."""
    args = parse_args(argv)
    STOP.clear()
    lock_out(args)
    try:
        return train_and_report(args)
    finally:
        release_locks()

def run_report(args):
    """`python sweep_report.py OUT --grid ...`; its exit status. The grid is this command's:
    --report-only's may differ from sweep.json's."""
    grid = {k: getattr(args, k) for k in GRID}
    grid["runs"] = [str(f.relative_to(args.out)) for _, f, _ in grid_runs(args)]
    cmd = [sys.executable, str(HERE / "sweep_report.py"), str(args.out)]
    cmd += ["--grid", json.dumps(grid)]
    cmd += ["--device", (args.devices or [args.device])[0]]
    if args.no_figures:
        cmd.append("--no-figures")
    return subprocess.run(cmd).returncode

def train_and_report(args):
    """main() once OUT is locked."""
    failures = []
    if not args.report_only:
        failures = train_everything(args)
    if STOP.is_set():   # no report of a half-done grid; __main__ says what stopped
        return {"failures": failures, "report": None}
    status = None
    if args.sharded and not args.report_only and not args.list:
        print(f"shard {args.shard[0]}/{args.shard[1]} done; once every shard is: "
              f"python sweep_report.py {args.out}")
    elif not args.list:
        status = run_report(args)
    if failures:
        lines = [f"  {f}: {why}" for f, why in failures]
        print(f"{len(failures)} run(s) failed:\n" + "\n".join(lines), flush=True)
    return {"failures": failures, "report": status}

if __name__ == "__main__":
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):   # the trainers stop too; the sweep waits
        signal.signal(getattr(signal, name), stop_children)
    try:
        result = main()
    except DataError as e:
        sys.exit(f"error: {e}")
    if STOP.is_set():
        stopped = sum(why.startswith("stopped by") for _, why in result["failures"])
        sys.exit(f"error: stopped by {STOP.signal_name} ({stopped} trainer(s) stopped); "
                 f"rerun the same command to go on")
    sys.exit(1 if result["failures"] or result["report"] else 0)
