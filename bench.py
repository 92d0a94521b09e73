"""Training speed: the bare model step vs our training loop vs a naive torchvision loop, in img/s.

For each of --models at --size px:
  (a) model step  forward + backward + Adam (median of --steps) on a fixed random batch on the
                  device, as the trainers step (autocast per --amp, channels_last, foreach Adam
                  on CPU / fused on CUDA; the classifier's mask_weighted_ce on forward_map, the
                  UNet's center_bce): no data work, the ceiling of (b). With its FLOPs per image
                  (FlopCounterMode, forward + backward) and its share of a matmul peak timed here.
  (b) our loop    train_classifier.py --alpha -1 1 and train_masker.py, run as a user runs
                  them, for --epochs on --images synthetic 575 px JPEGs with masks: the last
                  epoch's img_s in their log.csv.
  (c) naive loop  torchvision ImageFolder + DataLoader(--workers): per-sample PIL decode,
                  RandomResizedCrop, flips, ColorJitter, ToTensor (v2: ToImage + ToDtype),
                  Normalize (the mask cropped alike), feeding (a)'s step.
  (d) --guide     (b) of the classifier once per mask guidance (nomask, alpha -1 1, input, crop,
                  --rrr 0.01), interleaved in one run: each one's img/s and its ratio to nomask's.
b/a: the share of the bare model speed our loop keeps (1.0: data work is free); b/c: our
speed-up over the usual recipe. Timings only mean something on a quiet machine. E.g.
    python bench.py --size 64 --device cpu
    python bench.py --device cuda --size 224 --batch-size 256 --unet-batch-size 64 --out $OUT/bench
"""
import argparse
import csv
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, tv_tensors
from torchvision.transforms import v2

from data import IMAGENET_MEAN, IMAGENET_STD, DataError, atomic_write, save_json
from losses import center_bce, mask_weighted_ce
from resnet_cls import build_classifier
from unet import UNet

CLASSES = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
SOURCE_SIZE = 575        # the course images' side: what the naive loop decodes per sample
ALPHA = (-1.0, 1.0)      # the classifier's mask-weighted setting: the cell's surroundings
SCRIPTS = {"classifier": ["train_classifier.py", "--alpha", "-1", "1"], "unet": ["train_masker.py"]}
AMP_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GUIDES = {   # (d): train_classifier.py's flags of each mask guidance
    "nomask": [],
    "alpha-1_1": ["--alpha", "-1", "1"],
    "input": ["--mask-mode", "input"],
    "crop": ["--mask-mode", "crop"],
    "rrr0.01": ["--rrr", "0.01"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SCRIPTS), choices=SCRIPTS,
                   help="models to measure")
    p.add_argument("--size", type=int, default=224,
                   help="working size in px (>= 32; a multiple of 32 for the UNet)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per step (>= 2: BatchNorm)")
    p.add_argument("--unet-batch-size", type=int,
                   help="the UNet's images per step (default --batch-size)")
    p.add_argument("--images", type=int,
                   help="synthetic training images of (b) and (c) (default 4 batches)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps of (a), after an untimed one; their median counts")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs of (b) and (c); only the last one is timed")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count()),
                   help="DataLoader processes of (c) (0: none)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast, as in the trainers; auto: bf16 on GPUs of compute capability "
                        "8.0+ and CPUs with bf16 instructions, fp16 on older GPUs, else off")
    p.add_argument("--guide", action="store_true",
                   help="also (d): the classifier's loop under each mask guidance")
    p.add_argument("--peak-seconds", type=float, default=3.0,
                   help="how long to time the matmul peak")
    p.add_argument("--json",
                   help="also write the figures to this JSON file")
    p.add_argument("--out",
                   help="also write bench.json and bench.txt (what is printed) into this folder")
    args = p.parse_args(argv)
    args.batches = batch_sizes(args.models, args.batch_size, args.unet_batch_size)
    if not args.images:
        args.images = 4 * max(args.batches.values())
    check_flags(p, args)
    check_outputs(p, args.json, args.out)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: not a device (cpu, or cuda, cuda:1, ...)")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: not available here (no CUDA on this machine: cpu)")
    args.device = torch.device(args.device)
    if args.amp == "auto":   # resolved once, by the trainers' rule: (a), (b), (c) alike
        args.amp = pick_amp(args.device)
    return args


def batch_sizes(models, batch_size, unet_batch_size):
    """{model: images per step}: --batch-size, or the UNet's own --unet-batch-size."""
    batches = {}
    for name in models:
        batches[name] = batch_size
        if name == "unet" and unet_batch_size:
            batches[name] = unet_batch_size
    return batches


def check_flags(p, args):
    """One argparse error per broken rule, before any work: the user learns which rule failed."""
    if args.size < 32:
        p.error(f"--size {args.size}: need >= 32")
    if "unet" in args.models and args.size % 32:
        p.error(f"--size {args.size}: the UNet needs a multiple of 32 (or --models classifier)")
    if args.batch_size < 2:
        p.error(f"--batch-size {args.batch_size}: need >= 2 (BatchNorm)")
    if min(args.batches.values()) < 2:
        p.error(f"--unet-batch-size {args.unet_batch_size}: need >= 2 (BatchNorm)")
    if args.images < 2 * max(args.batches.values()):
        p.error(f"--images {args.images}: need at least 2 batches of the largest batch size")
    if args.guide and "classifier" not in args.models:
        p.error("--guide: times the classifier; keep it in --models")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: need >= 1")
    if args.epochs < 1:
        p.error(f"--epochs {args.epochs}: need >= 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: need >= 0")
    if not math.isfinite(args.peak_seconds):   # inf: the peak's loop would never end
        p.error(f"--peak-seconds {args.peak_seconds}: need a finite number")
    if not args.peak_seconds > 0:
        p.error(f"--peak-seconds {args.peak_seconds}: need > 0")


def check_outputs(p, json_path, out):
    """--json and --out refused before any work, not after the whole bench."""
    json_folder = None
    if json_path:
        json_folder = Path(json_path).parent
    if json_path and Path(json_path).is_dir():
        p.error(f"--json {json_path}: a folder; give a file name (--out takes a folder)")
    if json_path and json_folder.exists() and not json_folder.is_dir():
        p.error(f"--json {json_path}: {json_folder} is a file, not a folder")
    if json_path and json_folder.is_dir() and not os.access(json_folder, os.W_OK):
        p.error(f"--json {json_path}: cannot write in {json_folder}")
    if out and Path(out).exists() and not Path(out).is_dir():
        p.error(f"--out {out}: an existing file; give a folder (--json takes a file)")
    if out and Path(out).is_dir() and not os.access(out, os.W_OK):
        p.error(f"--out {out}: cannot write in {out}")


def pick_amp(device):
    """The --amp auto rule: bf16 where `device` computes it natively, fp16 on older GPUs, else
    off."""
    if device.type == "cuda":   # not is_bf16_supported(): True on a T4, which emulates bf16 slowly
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        return "bf16" if native_bf16 else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "off"


def sync(device):
    """Wait for the device's queued work: CUDA runs asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds fn() takes, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device, amp, seconds):
    """FLOP/s of back-to-back square matmuls in the autocast dtype for about `seconds`: the
    practical peak."""
    dtype = AMP_DTYPES[amp]
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)   # one output, reused
    reps = 1

    def matmuls():
        for _ in range(reps):
            torch.matmul(a, b, out=c)

    timed(matmuls, device)   # warm-up: library init, clocks up
    total = 0
    elapsed = 0.0
    while elapsed < seconds:
        elapsed += timed(matmuls, device)
        total += reps
        reps *= 2   # fewer syncs once one matmul is known to be fast
    return 2 * n ** 3 * total / elapsed


def make_step(name, device, amp):
    """A fresh model and Adam, built as the trainers build them, and step(x, y, m): one training
    step on images x (B, 3, S, S), labels y (B,) and masks m (B, 1, S, S)."""
    cuda = device.type == "cuda"
    if name == "classifier":
        model = build_classifier(len(CLASSES))
    else:
        model = UNet()
    model = model.to(device, memory_format=torch.channels_last).train()   # NHWC: the trainers'
    forward = model.forward_map if name == "classifier" else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3,
                                 fused=cuda or None, foreach=not cuda or None)
    autocast = torch.autocast(device.type, AMP_DTYPES[amp], enabled=amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")   # fp16 gradients underflow

    def step(x, y, m):
        with autocast:
            out = forward(x).float()
        if name == "classifier":
            loss, _ = mask_weighted_ce(out, y, m, ALPHA)
        else:
            loss = center_bce(out, m)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def model_step(name, args):
    """(a): (img/s, FLOPs per image) of one step on one fixed random batch already on the
    device."""
    step = make_step(name, args.device, args.amp)
    batch = args.batches[name]
    size = args.size
    device = args.device
    x = torch.randn(batch, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(len(CLASSES), (batch,), device=device)
    m = (torch.rand(batch, 1, size, size, device=device) < 0.3).float()
    # the counted step doubles as the warm-up one (cuDNN autotuning, oneDNN setup)
    with FlopCounterMode(display=False) as counter:
        step(x, y, m)
    times = [timed(lambda: step(x, y, m), device) for _ in range(args.steps)]
    speed = batch / statistics.median(times)   # median: robust to other jobs' bursts
    flops = counter.get_total_flops() / batch
    return speed, flops


def write_image(root, part, cls, stem, seed):
    """One smooth colour-noise JPEG with grain and a disc "cell", and its 0/255 disc mask PNG."""
    rng = np.random.default_rng(seed)
    side = SOURCE_SIZE
    coarse = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
    grain = rng.integers(-10, 11, (side, side, 3))   # smears are not flat: realistic JPEG sizes
    pixels = np.clip(np.asarray(smooth, np.int64) + grain, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    mask = Image.new("L", (side, side))
    r = rng.uniform(0.15, 0.3) * side
    x, y = rng.uniform(0.35, 0.65, 2) * side
    colour = tuple(rng.integers(60, 200, 3).tolist())
    disc = (x - r, y - r, x + r, y + r)
    ImageDraw.Draw(image).ellipse(disc, fill=colour)
    ImageDraw.Draw(mask).ellipse(disc, fill=255)
    image_path = Path(root, "WBC_100", part, "data", cls, stem + ".jpg")
    mask_path = Path(root, "WBC_100", part, "mask", cls, stem + ".png")
    for path, im in ((image_path, image), (mask_path, mask)):
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90)


def write_dataset(root, n_train):
    """ROOT/WBC_100/{train,val}/{data,mask}/<Class>/: n_train training images and one val image
    a class, each with a ground-truth mask, so the classifier's --alpha needs no masker run
    first."""
    classes = CLASSES[:n_train]   # every class needs a training image
    jobs = []
    for part, n in (("train", n_train), ("val", len(classes))):
        for i in range(n):
            jobs.append((part, classes[i % len(classes)], f"{part}{i:05d}"))
    with ThreadPoolExecutor(os.cpu_count()) as pool:   # PIL's encoders release the GIL
        futures = [pool.submit(write_image, root, *job, seed) for seed, job in enumerate(jobs)]
    for future in futures:
        future.result()   # raise a writer's error here


def our_loop(name, root, work, args, setting=None):
    """(b): the trainer run as a user runs it; the img/s of the last epoch in its log.csv.
    setting: a GUIDES key, the classifier's flags instead of SCRIPTS' (d)."""
    out = Path(work, f"run_{name}_{setting}")
    script = SCRIPTS[name]
    if setting:
        script = ["train_classifier.py", *GUIDES[setting]]
    path = Path(__file__).resolve().with_name(script[0])
    cmd = [sys.executable, str(path), *script[1:],
           "--data", str(root),
           "--split", "100",
           "--size", str(args.size),
           "--batch-size", str(args.batches[name]),
           "--epochs", str(args.epochs),
           "--save-every", "0",
           "--device", str(args.device),
           "--amp", args.amp,
           "--cache", str(Path(work, "cache")),
           "--out", str(out)]
    if setting:   # input and crop read val masks as a masker draws them: the ground truth's copy
        cmd += ["--masks", str(Path(work, "gt_masks"))]
    elif name == "classifier":
        cmd += ["--masks", str(Path(work, "no_masks"))]   # none there: the ground truth only
    if args.device.type == "cuda":
        torch.cuda.empty_cache()   # our cached blocks would crowd the trainer's GPU memory
    # cwd: nothing lands in the user's runs/
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stdout + done.stderr)[-3000:]
        sys.exit(f"bench: {script[0]} failed (exit {done.returncode}):\n{tail}")
    rows = list(csv.DictReader((out / "log.csv").read_text().splitlines()))
    return float(rows[-1]["img_s"])


def guide_loops(root, work, args, log):
    """(d): {setting: img/s} of the classifier's loop under each of GUIDES, logged with its
    ratio to nomask's."""
    for part in ("train", "val"):
        shutil.copytree(Path(root, "WBC_100", part, "mask"), Path(work, "gt_masks", part))
    speeds = {}
    for setting in GUIDES:
        speeds[setting] = our_loop("classifier", root, work, args, setting)
        ratio = speeds[setting] / speeds["nomask"]
        log(f"classifier {setting}: (d) our loop {speeds[setting]:.1f} img/s, {ratio:.2f}x nomask")
    return speeds


def load_pair(path):
    """ImageFolder's loader: the image and its mask <root>/mask/<Class>/<stem>.png, for v2 to
    crop together."""
    path = Path(path)
    mask_path = path.parents[2] / "mask" / path.parent.name / f"{path.stem}.png"
    with Image.open(mask_path) as im:
        cell = np.asarray(im.convert("L")) > 127
    mask = tv_tensors.Mask(torch.from_numpy(cell)[None])   # (1, H, W)
    return datasets.folder.default_loader(path), mask


def naive_loop(name, root, args):
    """(c): img/s of the last of --epochs epochs of (a)'s step fed by a per-sample-decoding
    DataLoader."""
    step = make_step(name, args.device, args.amp)
    device = args.device
    batch = args.batches[name]
    # v2 crops and flips the Mask with its image; jitter and normalising skip it
    transform = v2.Compose([
        v2.RandomResizedCrop(args.size),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(.2, .2, .2),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    folder = datasets.ImageFolder(Path(root, "WBC_100", "train", "data"), transform,
                                  loader=load_pair)
    loader = DataLoader(folder, batch, shuffle=True, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)   # workers start once

    def epoch():
        for (x, m), y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            m = m.to(device, non_blocking=True).float()
            step(x, y, m)

    for _ in range(args.epochs - 1):
        epoch()
    return len(loader) * batch / timed(epoch, device)   # drop_last: every batch is full


def bench_model(name, root, work, args, peak, log):
    """(a), (b), (c) of one model, each logged as it comes, and their ratios."""
    a, flops = model_step(name, args)
    log(f"{name}: (a) model step {a:.1f} img/s, {flops / 1e9:.2f} GFLOP/img")
    b = our_loop(name, root, work, args)
    c = naive_loop(name, root, args)
    log(f"{name}: (b) our loop {b:.1f} img/s, (c) naive loop {c:.1f} img/s")
    return {
        "model_step": a,
        "our_loop": b,
        "naive_loop": c,
        "b_over_a": b / a,
        "b_over_c": b / c,
        "flops_per_image": flops,
        "peak_share": flops * a / peak,
    }


def table(result, args):
    """The final report: a row per model."""
    header = (f"{'model':<11}{'(a) step':>10}{'(b) ours':>10}{'(c) naive':>10}{'b/a':>7}"
              f"{'b/c':>7}{'GFLOP/img':>11}{'peak':>7}"
              "   (img/s; GFLOP of fwd+bwd; peak: (a)'s share of the matmul peak)")
    lines = [header]
    for name in args.models:
        row = result[name]
        lines.append(f"{name:<11}{row['model_step']:>10.1f}{row['our_loop']:>10.1f}"
                     f"{row['naive_loop']:>10.1f}{row['b_over_a']:>7.2f}{row['b_over_c']:>7.2f}"
                     f"{row['flops_per_image'] / 1e9:>11.2f}{100 * row['peak_share']:>6.1f}%")
    return "\n".join(lines)


def save_outputs(result, lines, json_path, out):
    """--json's file; --out's bench.json and bench.txt (what was printed)."""
    if json_path:
        save_json(result, json_path)
    if not out:
        return
    text = "\n".join(lines + [""]).encode()
    atomic_write(Path(out, "bench.txt"), lambda f: f.write(text))   # atomic_write makes the folder
    save_json(result, Path(out, "bench.json"))


def main(argv=None):
    args = parse_args(argv)
    lines = []   # what is printed, kept for --out's bench.txt

    def log(line):
        print(line, flush=True)
        lines.append(line)

    if args.device.type == "cuda":   # the trainers' settings
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak(args.device, args.amp, args.peak_seconds)
    result = {
        "device": str(args.device),
        "amp": args.amp,
        "size": args.size,
        "batch_size": args.batches,
        "images": args.images,
        "epochs": args.epochs,
        "workers": args.workers,
        "torch": torch.__version__,
        "peak_flops": peak,
    }
    log(f"bench | {args.device} | amp {args.amp} | {args.size} px | batch {args.batches} "
        f"| {args.images} images, {args.epochs} epochs | naive workers {args.workers} "
        f"| matmul peak {peak / 1e12:.3f} TFLOP/s")
    with tempfile.TemporaryDirectory(prefix="bench_") as work:
        root = Path(work, "data")
        write_dataset(root, args.images)
        for name in args.models:
            result[name] = bench_model(name, root, work, args, peak, log)
        if args.guide:
            result["guide"] = guide_loops(root, work, args, log)
    log(table(result, args))
    save_outputs(result, lines, args.json, args.out)
    return result


if __name__ == "__main__":
    try:
        main()
    except DataError as e:   # a full disk while writing --json or --out: one line
        sys.exit(f"error: {e}")
