"""Throughput benchmark of the training input pipeline and models (GitHub issue 4).

On synthetic 575x575 JPEGs (the course images' size: smooth colour noise, light grain and a
disc "cell", quality 90, with 0/255 disc mask PNGs), at one --size and --batch, it measures:

  (a) model step   forward + backward + Adam step on one fixed float batch already on the
                   device, with the training scripts' compute flags (data.Compute: channels_last,
                   autocast, Adam kernel, --compile; the same flags here), same loss as (b). The
                   ceiling for (b): no data work at all.
  (b) our loop     the real train_one_epoch of train_classifier.py (mask-weighted CE, alpha
                   (-1, 1)) and of train_masker.py (center_bce) on uint8 tensors from
                   data.load_set: steady-state img/s over --epochs timed epochs after a warm-up,
                   timed from outside with a device sync. The one-off decode (load_set on a cold
                   cache) is reported apart as preprocessing time, with the cache-hit load time
                   of a second call.
  (c) naive loop   torchvision ImageFolder-style per-sample PIL decode of the 575 px JPEG +
                   torchvision.transforms (RandomResizedCrop(size), flips, ColorJitter, ToTensor,
                   Normalize; joint crop/flips with the mask for the UNet) in a DataLoader with
                   --workers processes, fp32, NCHW model, plain loop (CE or center_bce).

for the classifier (ResNetClassifier) and the UNet, and prints img/s of each, FLOPs per image
(torch.utils.flop_counter over one forward + backward, divided by the batch), the FLOP/s that
(a) and (b) achieve and their share of a matmul peak timed on the spot (about --peak-seconds of
a large matmul in the autocast dtype, fp32 when autocast is off). FLOPs count convolutions and
matmuls only (2 per multiply-add); the optimizer and elementwise work are not counted.

How to read the ratios:
  b/a  how much of the bare model speed the full loop keeps: 1.0 = data loading, augmentation
       and bookkeeping cost nothing. Below 1: the loop, not the model, is the bottleneck.
  b/c  how much faster our loop is than the ordinary torchvision recipe on the same machine.
  cache_hit_ratio / startup_ratio  a second run's start-up (cache hit) over the first run's
       preprocessing (decode + cache write).
Issue 4 targets: classifier at --size 224 and --size 96 on CPU: b/a >= 0.95 and b/c >= 1.8;
UNet at --size 128: b/a >= 0.9; caching 10k images at 224 px (3*224*224*10000 bytes = 1.5 GB
array) peaks at <= 2.5 GB RSS growth, and a second run starts in under 10% of the first's
preprocessing time. One run measures one size: run it once per size, e.g.

    python bench.py --size 224 --json results/bench_224.json
    python bench.py --size 96 --models classifier --cache-images 0 --json results/bench_96.json
    python bench.py --size 128 --models unet --cache-images 0 --json results/bench_128.json

The memory test (--cache-images N, 0 skips it) decodes N synthetic JPEGs at --cache-size with
data.decode_all into an empty cache and measures the process's peak RSS growth (Linux: VmHWM
after resetting it through /proc/self/clear_refs; elsewhere ru_maxrss, a lower bound); with
N < 10000 the figure is extrapolated linearly to 10k (fixed overheads scale too, so it errs high).
Timings are only meaningful on a quiet machine.
"""
import argparse
import contextlib
import ctypes
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

import data
import train_classifier
import train_masker
from losses import center_bce, mask_weighted_ce
from resnet_cls import ResNetClassifier, build_classifier
from unet import UNet, build_unet

SOURCE_SIZE = 575                 # the course images' side
CLASSES = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
ALPHA = (-1.0, 1.0)               # the classifier's mask-weighted setting of `make demo`
COURSE_IMAGES = 10_000            # the memory target is for a course-sized set
MODELS = ("classifier", "unet")
LRS = {"classifier": 3e-3, "unet": 1e-3}   # the scripts' default learning rates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="working size in px (the UNet needs a multiple of 32)")
    p.add_argument("--batch", type=int, default=32, help="images per step in (a), (b) and (c)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of the bare model step (a)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before each timing")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs over --images of the loops (b) and (c)")
    p.add_argument("--images", type=int, default=256, help="synthetic 575 px JPEGs (with masks) for (b) and (c)")
    p.add_argument("--cache-images", type=int, default=COURSE_IMAGES,
                   help="JPEGs for the cache memory test (0 skips it; under 10000 the peak is extrapolated)")
    p.add_argument("--cache-size", type=int, default=224, help="decode size of the cache memory test")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--models", default="classifier,unet",
                   help="comma-separated subset of classifier,unet; none: only the data and cache figures")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="DataLoader worker processes of the naive loop (c) (0 = in the main process)")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="how long to time the matmul peak")
    p.add_argument("--work", default=None,
                   help="folder for the synthetic JPEGs and caches; JPEGs already there are reused and the "
                        "folder is kept (default: a temporary folder, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder and the test caches")
    p.add_argument("--json", default=None, help="also write every printed figure to this JSON file")
    data.add_compute_args(p.add_argument_group("compute path of (a) and (b), as in the training scripts"))
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip() not in ("", "none")]
    if any(m not in MODELS for m in args.models):
        p.error(f"--models {','.join(args.models)}: pick from {','.join(MODELS)}")
    if args.size < 32 or ("unet" in args.models and args.size % 32):
        p.error(f"--size {args.size}: at least 32, and a multiple of 32 for the UNet")
    if min(args.batch, args.steps, args.epochs) < 1 or args.warmup < 0 or args.workers < 0:
        p.error("--batch, --steps and --epochs must be positive, --warmup and --workers not negative")
    if args.images < 2 * args.batch:
        p.error(f"--images {args.images}: need at least two batches (2 x --batch = {2 * args.batch})")
    if args.cache_images < 0 or args.cache_size < 32 or args.peak_seconds <= 0:
        p.error("--cache-images must be >= 0, --cache-size >= 32 and --peak-seconds positive")
    return args


# ---------------------------------------------------------------------------- timing helpers

def sync(device):
    """Wait for queued kernels, so a host clock brackets the work itself (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds fn() takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device, dtype, seconds):
    """FLOP/s of back-to-back square matmuls for about `seconds`: the practical peak here."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty_like(a)                          # one output reused: queued matmuls hold no memory

    def run(reps):
        for _ in range(reps):
            torch.matmul(a, b, out=c)

    timed(lambda: run(1), device)                    # warm-up: library init, clocks up
    reps, elapsed, total = 1, 0.0, 0
    while elapsed < seconds:
        elapsed += timed(lambda: run(reps), device)
        total += reps
        reps *= 2                                    # fewer syncs once one matmul is known to be fast
    return 2 * n ** 3 * total / elapsed


# ---------------------------------------------------------------------------- synthetic data

def synth_pair(i, size=SOURCE_SIZE):
    """Image i: smooth colour noise + grain + a disc (PIL RGB), and its 0/255 disc mask (PIL L)."""
    rng = np.random.default_rng(i)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.integers(-10, 11, (size, size, 3), dtype=np.int16)   # real smears are not flat: realistic JPEG sizes
    im = Image.fromarray(np.clip(np.asarray(smooth, np.int16) + grain, 0, 255).astype(np.uint8))
    r = int(rng.uniform(0.15, 0.3) * size)
    cx, cy = (int(v) for v in rng.uniform(0.35, 0.65, 2) * size)
    box = (cx - r, cy - r, cx + r, cy + r)
    ImageDraw.Draw(im).ellipse(box, fill=tuple(int(v) for v in rng.integers(60, 200, 3)))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return im, mask


def write_synth(work, n_train, n_total, workers):
    """JPEGs 0..n_total-1; the first n_train in work/train/{data,mask}/<Class>/ (with a mask PNG),
    the rest in work/extra/. Files already there are kept. Returns (train dir, mask dir, every JPEG)."""
    work = Path(work)

    def paths(i):
        if i < n_train:
            cls = CLASSES[i % len(CLASSES)]
            return work / "train" / "data" / cls / f"img{i:05d}.jpg", work / "train" / "mask" / cls / f"img{i:05d}.png"
        return work / "extra" / f"img{i:05d}.jpg", None

    def one(i):
        jpg, png = paths(i)
        if jpg.exists() and (png is None or png.exists()):
            return jpg
        im, mask = synth_pair(i)
        for path, pic, kw in ((jpg, im, {"quality": 90}), (png, mask, {})):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                data.atomic_write(path, lambda f: pic.save(f, format=path.suffix[1:].replace("jpg", "jpeg"), **kw))
        return jpg

    with ThreadPoolExecutor(max(1, workers or 1)) as pool:   # PIL's encoders release the GIL
        jpgs = list(pool.map(one, range(n_total)))
    return work / "train" / "data", work / "train" / "mask", jpgs


# ---------------------------------------------------------------------------- memory

def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def release_free_heap():
    """Hand glibc's freed-but-kept heap back to the OS, so a later allocation shows up as RSS growth
    instead of silently reusing pages the process already holds (matters for a small test)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        pass


def peak_rss_growth(fn):
    """(fn(), peak RSS growth in bytes during fn, how it was measured)."""
    release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")    # Linux: resets VmHWM (peak RSS) to the current RSS
        base = _status_kb("VmRSS")
        out = fn()
        return out, (_status_kb("VmHWM") - base) * 1024, "VmHWM"
    except OSError:
        # no /proc: the lifetime peak only grows, so this misses a growth below an earlier peak
        unit = 1 if sys.platform == "darwin" else 1024    # ru_maxrss is bytes on macOS, KiB on Linux
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn()
        return out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * unit, "ru_maxrss (lower bound)"


def cache_memory_test(jpgs, size, cache_dir, log):
    """Peak RSS growth and time of decode_all building the cache of `jpgs`, then a cache-hit call."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    (arr, _, bad), peak, how = peak_rss_growth(lambda: data.decode_all("image", jpgs, size, cache_dir, log=log))
    build_s = time.perf_counter() - start
    if bad:
        raise SystemExit(f"cache test: {len(bad)} synthetic JPEG(s) unreadable, e.g. {jpgs[min(bad)]}")
    del arr                                              # a second run starts without the first's array
    start = time.perf_counter()
    (arr, _, _), hit_peak, _ = peak_rss_growth(lambda: data.decode_all("image", jpgs, size, cache_dir, log=log))
    hit_s = time.perf_counter() - start
    del arr
    scale = COURSE_IMAGES / len(jpgs)
    return {"cache_images": len(jpgs), "cache_size": size, "cache_peak_rss_bytes": peak,
            "cache_hit_peak_rss_bytes": hit_peak, "cache_rss_method": how,
            "cache_peak_rss_10k_bytes": round(peak * scale), "cache_extrapolated": len(jpgs) < COURSE_IMAGES,
            "cache_array_10k_bytes": 3 * size * size * COURSE_IMAGES,
            "cache_build_s": build_s, "cache_hit_s": hit_s, "cache_hit_ratio": hit_s / build_s}


# ---------------------------------------------------------------------------- (a) the model step

def new_model(name, compute):
    """A fresh model and Adam as the training script builds them (compute flags applied; random
    init: speed doesn't depend on weights)."""
    if name == "classifier":
        model = compute.prepare(build_classifier(len(CLASSES)), methods=("forward", "forward_map"))
    else:
        model = compute.prepare(build_unet())
    return model, compute.adam(model.parameters(), lr=LRS[name])


def train_step(name, model, optimizer, x, y, m, compute):
    """One step as train_one_epoch does it: autocast forward, fp32 loss, backward, Adam."""
    with compute.autocast:
        out = model.forward_map(x) if name == "classifier" else model(x)
    loss = mask_weighted_ce(out, y, m, ALPHA)[0] if name == "classifier" else center_bce(out, m)
    data.optimizer_step(loss, model, optimizer, scaler=compute.scaler)


def fixed_batch(batch, size, compute):
    """A normalised-looking float batch, labels and a 0/1 disc mask, on the device, in the model's memory format."""
    device = compute.device
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=compute.memory_format)
    y = torch.randint(len(CLASSES), (batch,), device=device)
    r = torch.arange(size, device=device, dtype=torch.float32) - size / 2
    disc = ((r[:, None] ** 2 + r[None, :] ** 2) < (size / 4) ** 2).float()
    return x, y, disc.expand(batch, 1, size, size).contiguous()


def flops_per_image(name, model, optimizer, batch, compute):
    """Conv/matmul FLOPs of one forward + backward, per image."""
    x, y, m = batch
    with FlopCounterMode(display=False) as counter:
        train_step(name, model, optimizer, x, y, m, compute)
    return counter.get_total_flops() / x.shape[0]


def bench_model_step(name, args, compute):
    """(a): img/s of train_step on a fixed batch, and FLOPs per image."""
    model, optimizer = new_model(name, compute)
    batch = fixed_batch(args.batch, args.size, compute)
    flops = flops_per_image(name, model, optimizer, batch, compute)   # doubles as the first warm-up step
    for _ in range(args.warmup):
        train_step(name, model, optimizer, *batch, compute)
    seconds = timed(lambda: [train_step(name, model, optimizer, *batch, compute) for _ in range(args.steps)],
                    compute.device)
    return args.steps * args.batch / seconds, flops


# ---------------------------------------------------------------------------- (b) our loop

def run_epoch(name, model, optimizer, train_set, args, compute, max_batches=None):
    """The training script's own train_one_epoch; returns the img/s it reports itself."""
    if name == "classifier":
        return train_classifier.train_one_epoch(model, train_set, optimizer, ALPHA, None, False, args.batch,
                                                compute, max_batches)[2]
    return train_masker.train_one_epoch(model, train_set.images, train_set.masks, center_bce, optimizer,
                                        args.batch, compute, max_batches)[2]


def epoch_images(name, n, batch):
    """Images one train_one_epoch consumes (data.train_batches: the scripts' own batching)."""
    return sum(len(i) for i in data.train_batches(n, batch))


def bench_loop(name, train_set, args, compute):
    """(b): steady-state img/s of the real train_one_epoch, timed from outside with a device
    sync, and the img/s train_one_epoch reports itself (its clock stops before its last sync)."""
    model, optimizer = new_model(name, compute)
    if args.warmup:
        run_epoch(name, model, optimizer, train_set, args, compute, max_batches=args.warmup)
    reported = []
    seconds = timed(lambda: [reported.append(run_epoch(name, model, optimizer, train_set, args, compute))
                             for _ in range(args.epochs)], compute.device)
    return args.epochs * epoch_images(name, len(train_set), args.batch) / seconds, sum(reported) / len(reported)


# ---------------------------------------------------------------------------- (c) the naive loop

def naive_transform(size):
    return transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
        transforms.ColorJitter(0.2, 0.2, 0.2), transforms.ToTensor(),
        transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


class MaskedFolder(datasets.ImageFolder):
    """ImageFolder that also opens <mask_root>/<Class>/<stem>.png and gives it the image's crop and flips."""

    def __init__(self, root, mask_root, size):
        super().__init__(root)
        self.mask_root, self.size = Path(mask_root), size
        self.jitter = transforms.ColorJitter(0.2, 0.2, 0.2)

    def __getitem__(self, i):
        path, label = self.samples[i]
        image = self.loader(path)
        with Image.open(self.mask_root / self.classes[label] / f"{Path(path).stem}.png") as im:
            mask = im.convert("L")
        top, left, h, w = transforms.RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size])
        mask = TF.resized_crop(mask, top, left, h, w, [self.size, self.size], TF.InterpolationMode.NEAREST)
        for flip in (TF.hflip, TF.vflip):
            if torch.rand(()) < 0.5:
                image, mask = flip(image), flip(mask)
        x = TF.normalize(TF.to_tensor(self.jitter(image)), data.IMAGENET_MEAN, data.IMAGENET_STD)
        return x, (TF.to_tensor(mask) > 0.5).float()


def bench_naive(name, train_dir, mask_dir, args, device):
    """(c): img/s of a plain fp32 NCHW loop over a torchvision DataLoader (fresh decode per sample)."""
    model = ResNetClassifier(len(CLASSES)) if name == "classifier" else UNet()
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LRS[name])
    dataset = (datasets.ImageFolder(train_dir, naive_transform(args.size)) if name == "classifier"
               else MaskedFolder(train_dir, mask_dir, args.size))
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        drop_last=name == "classifier", persistent_workers=args.workers > 0)

    def step(x, target):
        x, target = x.to(device), target.to(device)
        out = model(x)
        loss = F.cross_entropy(out, target) if name == "classifier" else center_bce(out, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(x)

    model.train()
    for i, (x, target) in enumerate(loader):      # warm-up; persistent workers stay up for the timed epochs
        if i >= args.warmup:
            break
        step(x, target)
    seen = []
    seconds = timed(lambda: [seen.append(step(x, t)) for _ in range(args.epochs) for x, t in loader], device)
    return sum(seen) / seconds


# ---------------------------------------------------------------------------- main

def fmt_bytes(n):
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.1f} MB"


def fmt_flops(f):
    return f"{f / 1e12:.2f} T" if f >= 1e11 else f"{f / 1e9:.1f} G"


def bench_one(name, train_set, train_dir, mask_dir, args, compute, peak, log):
    """(a), (b), (c) for one model; prints them and returns its figures."""
    model_img_s, flops = bench_model_step(name, args, compute)
    log(f"{name:10s} (a) model step  {model_img_s:8.1f} img/s | {fmt_flops(flops)}FLOP/img (fwd+bwd) -> "
        f"{fmt_flops(flops * model_img_s)}FLOP/s = {100 * flops * model_img_s / peak:.1f}% of peak")
    loop_img_s, reported = bench_loop(name, train_set, args, compute)
    log(f"{name:10s} (b) our loop    {loop_img_s:8.1f} img/s | {fmt_flops(flops * loop_img_s)}FLOP/s = "
        f"{100 * flops * loop_img_s / peak:.1f}% of peak (train_one_epoch itself reports {reported:.1f} img/s)")
    naive_img_s = bench_naive(name, train_dir, mask_dir, args, compute.device)
    log(f"{name:10s} (c) naive loop  {naive_img_s:8.1f} img/s | ImageFolder-style PIL decode + torchvision."
        f"transforms, DataLoader num_workers={args.workers}, fp32 NCHW")
    log(f"{name:10s} b/a {loop_img_s / model_img_s:.3f} | b/c {loop_img_s / naive_img_s:.2f}")
    return {"model_img_s": model_img_s, "loop_img_s": loop_img_s, "naive_img_s": naive_img_s,
            "loop_reported_img_s": reported, "b_over_a": loop_img_s / model_img_s,
            "b_over_c": loop_img_s / naive_img_s, "flops_per_img": flops,
            "model_flop_s": flops * model_img_s, "loop_flop_s": flops * loop_img_s,
            "model_peak_share": flops * model_img_s / peak, "loop_peak_share": flops * loop_img_s / peak}


def main(argv=None, log=print):
    args = parse_args(argv)
    compute = data.Compute(args, data.pick_device(args.device))
    log(f"bench | device {compute.device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"size {args.size} | batch {args.batch} | "
        f"naive num_workers {args.workers} (os.cpu_count() {os.cpu_count()})")
    with work_folder(args.work, args.keep) as work:
        result = run(args, work, compute, log)
    if args.json:
        data.save_json(result, args.json)
        log(f"wrote {args.json}")
    return result


@contextlib.contextmanager
def work_folder(path, keep):
    """The given folder (never removed: it may hold a user's files), or a temporary one removed
    on the way out unless `keep`."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_"))
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work, compute, log):
    """Every measurement, printed as it comes; returns the figures."""
    device = compute.device
    log(f"compute (a) and (b): {compute.describe()}")
    dtype = getattr(compute.autocast, "fast_dtype", torch.float32)    # a nullcontext (autocast off) has none: fp32
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "compute": compute.settings, "autocast": compute.amp, "channels_last": compute.settings["channels_last"],
              "size": args.size, "batch": args.batch,
              "workers": args.workers, "images": args.images, "epochs": args.epochs, "steps": args.steps}
    peak = matmul_peak(device, dtype, args.peak_seconds)
    result.update(peak_flops=peak, peak_dtype=str(dtype).removeprefix("torch."))
    log(f"matmul peak ({result['peak_dtype']}): {fmt_flops(peak)}FLOP/s")

    start = time.perf_counter()
    train_dir, mask_dir, jpgs = write_synth(work, args.images, max(args.images, args.cache_images), args.workers)
    result["jpeg_mean_bytes"] = sum(p.stat().st_size for p in jpgs[:args.images]) / args.images
    log(f"synthetic set: {len(jpgs)} JPEGs {SOURCE_SIZE}x{SOURCE_SIZE} "
        f"(mean {result['jpeg_mean_bytes'] / 1e3:.0f} KB), masks for the first {args.images}, in {work} ({time.perf_counter() - start:.1f} s)")
    if args.cache_images:
        result.update(report_cache_test(jpgs[:args.cache_images], args, work, log))
    train_set, figures = load_timed(train_dir, mask_dir, args.size, work / "cache_loop", log)
    result.update(figures)
    for name in args.models:
        result[name] = bench_one(name, train_set, train_dir, mask_dir, args, compute, peak, log)
    return result


def report_cache_test(jpgs, args, work, log):
    """The memory test, printed; its cache (1.5 GB at the default) is removed unless --keep."""
    cache = cache_memory_test(jpgs, args.cache_size, work / "cache_mem", log)
    log(f"cache: decode_all {cache['cache_images']} JPEGs -> {args.cache_size} px in {cache['cache_build_s']:.2f} s, "
        f"peak RSS +{fmt_bytes(cache['cache_peak_rss_bytes'])} ({cache['cache_rss_method']}); for 10k images: "
        f"{fmt_bytes(cache['cache_peak_rss_10k_bytes'])}"
        + (" (extrapolated linearly)" if cache["cache_extrapolated"] else "")
        + f", array alone {fmt_bytes(cache['cache_array_10k_bytes'])}")
    log(f"cache: second call (cache hit) {cache['cache_hit_s']:.3f} s = "
        f"{100 * cache['cache_hit_ratio']:.1f}% of the first call's preprocessing")
    if not args.keep:
        shutil.rmtree(work / "cache_mem", ignore_errors=True)
    return cache


def load_timed(train_dir, mask_dir, size, cache_dir, log):
    """(b)'s data, loaded as the scripts load it: load_set on an empty cache (the one-off
    preprocessing), then again (a second run's cache hit). Returns the set and both times."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    quiet = lambda *a, **k: None                         # noqa: E731  load_set's notes are not figures
    start = time.perf_counter()
    data.load_set(train_dir, size, mask_dirs=[mask_dir], cache_dir=cache_dir, log=quiet)
    preprocess_s = time.perf_counter() - start
    start = time.perf_counter()
    train_set = data.load_set(train_dir, size, mask_dirs=[mask_dir], cache_dir=cache_dir, log=quiet)
    hit_s = time.perf_counter() - start
    log(f"(b) preprocessing: load_set {len(train_set)} images + masks -> {size} px: {preprocess_s:.2f} s "
        f"(decode + cache write, not in (b)'s img/s); second call (cache hit) {hit_s:.3f} s = "
        f"{100 * hit_s / preprocess_s:.1f}%")
    return train_set, {"loop_preprocess_s": preprocess_s, "loop_cache_hit_s": hit_s,
                       "startup_ratio": hit_s / preprocess_s}


if __name__ == "__main__":
    main()
