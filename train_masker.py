"""Stage 1: train the UNet mask generator, then draw a mask for every image.

    python train_masker.py --split 10                            # WBC_10's masks, center loss
    python train_masker.py --split 100 --pretrain-on data/CAM16  # CAM16's masks, then WBC_100's

Writes to --out: checkpoint.pt (also every --save-every epochs, for --resume), log.csv, metrics.json
and masks/{train,val}/<Class>/<stem>.png (0/255, at each image's size) of WBC_<split>/train and
WBC_100/val."""
import argparse
import atexit
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import (SPLITS, DataError, batch_indices, check_no_leakage, claim_folder, image_keys,
                  infer, load_checkpoint, load_set, make_batch, mask_root, save_checkpoint,
                  save_csv, save_json, save_mask_png, wbc_dirs)
from losses import MASKER_LOSSES, mask_counts, mask_metrics
from resnet_cls import load_backbone, resnet34_state_dict
from unet import UNet

RANK = int(os.environ.get("RANK", 0))   # torchrun sets both
WORLD = int(os.environ.get("WORLD_SIZE", 1))
# the flags a --resume may change; any other must be the killed run's
MAY_CHANGE = ("cache", "skip_bad", "amp", "compile", "device", "out", "save_every", "resume",
              "threshold")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data",
                   help="dataset root (ROOT/WBC_<split>/train, ROOT/WBC_100/val)")
    g.add_argument("--split", type=int, default=10, choices=SPLITS,
                   help="fine-tune on the masks of WBC_<split>")
    g.add_argument("--size", type=int, default=224, help="working size in px (a multiple of 32)")
    g.add_argument("--holdout", type=float, default=0.0,
                   help="share of masks held out if WBC_100/val/mask is missing")
    g.add_argument("--cache", default=".cache/decoded",
                   help="decoded-image cache folder ('none' = off)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images (listed) instead of stopping")
    g = p.add_argument_group("pretraining")
    g.add_argument("--pretrain-on", nargs="+", default=[], metavar="ROOT",
                   help="first train on the masks of all ROOTs together: ROOT/train "
                   "(e.g. data/CAM16), ROOT/WBC_100/train or ROOT/CAM16/train")
    g.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of pretraining")
    g.add_argument("--replay", type=int, default=0, metavar="N",
                   help="fine-tune on those too, the split's N times")
    weights = g.add_mutually_exclusive_group()   # each sets the encoder's starting weights
    weights.add_argument("--pretrained", action="store_true",
                         help="ImageNet encoder (torchvision download)")
    weights.add_argument("--weights", help="local torchvision resnet34 state dict for the encoder")
    g = p.add_argument_group("training")
    g.add_argument("--loss", default="center", choices=sorted(MASKER_LOSSES),
                   help="center-weighted or plain BCE")
    g.add_argument("--epochs", type=int, default=40,
                   help="epochs for WBC_100's masks; smaller splits get more")
    g.add_argument("--batch-size", type=int, default=16,
                   help="images per step, all processes together (>= 2 each)")
    g.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (cosine decay to 0 in each stage)")
    g.add_argument("--threshold", type=float, default=0.5, help="cell: probability >= this")
    g.add_argument("--zoom", type=float, nargs=2, default=[0.75, 1.0],
                   help="crop side range (above 1 zooms out)")
    g.add_argument("--stain", type=float, default=0.0,
                   help="hue/saturation/grey augmentation strength in [0, 1]")
    g.add_argument("--blur", type=float, default=0.0,
                   help="largest Gaussian blur sigma in px (0 = off)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of shuffling, augmentation, init and --holdout (>= 0)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast; auto: bf16 on GPUs of compute capability 8.0+ and CPUs with "
                   "bf16 instructions, fp16 + grad scaler on older GPUs, else off")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (slow first steps)")
    g.add_argument("--clip-grad", type=float, default=0.0,
                   help="clip the gradient norm to this (0 = off)")
    g.add_argument("--out", help="output folder (default runs/masker_WBC_<split>)")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N epochs (0 = about 20 per stage)")
    g.add_argument("--resume", action="store_true",
                   help="continue the killed run in --out, with the same flags")
    g.add_argument("--dry-run", action="store_true",
                   help="one batch, one epoch a stage, outputs under runs/dry_run")
    args = p.parse_args(argv)
    check_args(p, args)
    return args

def check_args(p, args):
    """One argparse error per broken rule, so the user reads which rule failed; settles
    --device and --out."""
    if args.batch_size % WORLD:   # every process gets an equal share
        p.error(f"--batch-size {args.batch_size}: need a multiple of the {WORLD} process(es)")
    if args.batch_size < 2 * WORLD:   # BatchNorm cannot train on one row
        p.error(f"need --batch-size 2+ (BatchNorm) x {WORLD} process(es)")
    if args.size < 32 or args.size % 32:
        p.error("need --size a multiple of 32 (the UNet)")
    if not 0 < args.lr < math.inf:
        p.error("need finite --lr > 0")
    if not 0 <= args.clip_grad < math.inf:
        p.error("need finite --clip-grad >= 0")
    if not 0 <= args.threshold <= 1:
        p.error("need --threshold in [0, 1]")
    if not 0 <= args.holdout < 1:
        p.error("need --holdout in [0, 1)")
    if not 0 <= args.stain <= 1:
        p.error("need --stain in [0, 1]")
    if not 0 <= args.blur < math.inf:
        p.error("need finite --blur >= 0")
    if not 0 < args.zoom[0] <= args.zoom[1] < math.inf:
        p.error("need finite 0 < --zoom LO <= HI")
    if args.epochs < 1 or args.pretrain_epochs < 1:
        p.error("need --epochs, --pretrain-epochs >= 1")
    if args.seed < 0 or args.save_every < 0:
        p.error("need --seed, --save-every >= 0")
    if args.replay < 0:
        p.error("need --replay >= 0")
    if args.replay and not args.pretrain_on:
        p.error("--replay replays --pretrain-on's masks: give --pretrain-on")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: unknown (cpu, or cuda, cuda:1, ...)")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: not available here (no CUDA; use cpu)")
    runs = Path("runs/dry_run" if args.dry_run else "runs")   # never fed to a real run
    args.out = Path(args.out or runs / f"masker_WBC_{args.split}")

def pick_amp(device):
    """The --amp auto rule: bf16 where `device` computes it natively, fp16 on older GPUs, else
    off."""
    if device.type == "cuda":   # not is_bf16_supported(): True on a T4, which emulates bf16 slowly
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        return "bf16" if native_bf16 else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "off"

def interrupt(signum, frame):   # SIGTERM (kill, a scheduler), SIGHUP (a closed terminal): as Ctrl-C
    raise KeyboardInterrupt

def adam(model, lr, device):
    """Adam with its fastest kernels here: fused on CUDA, foreach (a list of tensors) elsewhere."""
    cuda = device.type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=lr, fused=cuda or None, foreach=not cuda or None)

def check_learned(probs, threshold, out):
    """DataError if every image's mask is empty (Dice 0): a UNet that learned nothing (an --lr too
    high: finite loss, exploded weights) must not hand the classifier empty masks. Every mask all
    cell (also what a few steps of a smoke test or a 1-epoch sweep draw) only warns: the classifier
    refuses such masks where it needs them."""
    cells = torch.cat([p > threshold for p in probs])   # (N, 1, S, S)
    if not cells.any():
        raise DataError(f"{out}: every image's mask is empty: the UNet learned nothing, no masks "
                        f"written; train again with a lower --lr or more --epochs")
    if cells.all():
        print(f"warning: {out}: every image's mask is all cell: the UNet learned nothing yet; "
              f"train longer before using its masks")

def hold_out(labelled, share, seed):
    """(kept, held out): a seeded `share` of the labelled set (at least one image) held out."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labelled), generator=generator)
    keep = order >= max(1, round(share * len(labelled)))
    return labelled.subset(keep), labelled.subset(~keep)

def joined(image_sets):
    """The images (N, 3, S, S) and masks (N, 1, S, S) of `image_sets`, one after the other."""
    images = torch.cat([s.images for s in image_sets])
    masks = torch.cat([s.masks for s in image_sets])
    return images, masks

def stage_list(labelled, pre, epochs, resume, args):
    """[(name, images, masks, epochs)]: --pretrain-on's masks together, then WBC_<split>'s (with
    --replay N: N times, and --pretrain-on's once more); resumed: from the killed run's stage.
    Refuses a stage of too few rows."""
    where = wbc_dirs(args.data, args.split)["train_mask"]
    stages = []
    if pre:
        pre_epochs = 1 if args.dry_run else args.pretrain_epochs
        stages.append(("pretrain", *joined(pre), pre_epochs))
        flag = f"--pretrain-on {' '.join(args.pretrain_on)}"
        check_rows(len(stages[-1][1]), args.batch_size, flag)
    wbc = [labelled] * max(1, args.replay)
    if args.replay:
        wbc += pre
    stages.append(("wbc", *joined(wbc), epochs))
    check_rows(len(stages[-1][1]), args.batch_size, where)
    names = [name for name, *_ in stages]
    if resume:   # a resumed run goes on from the stage it was killed in
        stages = stages[names.index(resume["stage"]):]
    return stages

def train_one_epoch(forward, model, images, masks, optimizer, scaler, autocast, args):
    """One pass over uint8 images (N, 3, S, S), masks (N, 1, S, S) (one batch with --dry-run),
    this process on its share of each batch. Returns loss, pixel error, img/s, the 1-based step of
    the first non-finite loss (0: none)."""
    started = time.perf_counter()
    model.train()
    batches = batch_indices(len(images), args.batch_size, shuffle=True, drop_last=True)
    if args.dry_run:
        batches = batches[:1]
    totals = torch.zeros(2, device=args.device)   # sums on the device: no host syncs
    bad_step = torch.zeros((), device=args.device)
    aug = dict(zoom=args.zoom, stain=args.stain, blur=args.blur)
    for step, idx in enumerate(batches, 1):
        mine = slice(RANK * len(idx) // WORLD, (RANK + 1) * len(idx) // WORLD)   # my rows of it
        x, target = make_batch(images, masks, idx, args.device, train=True, part=mine, aug=aug)
        with autocast:
            logits = forward(x)   # (B, 1, S, S)
        loss = MASKER_LOSSES[args.loss](logits, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()   # DDP averages the gradients
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        wrong = (logits.detach() >= 0) != target.bool()   # logit >= 0: probability >= 0.5 is cell
        totals += torch.stack([loss.detach(), wrong.float().mean()]) * len(target)
    if WORLD > 1:   # sums over every process; any process's bad step stops them all
        dist.all_reduce(totals)
        bad_step = first_over_processes(bad_step, len(batches))
    seen = sum(len(idx) for idx in batches)   # images (not only this process's)
    return (*(totals / seen).tolist(), seen / (time.perf_counter() - started), int(bad_step))

def first_over_processes(bad_step, n_steps):
    """The first step (1-based; 0: none) at which any process saw a non-finite loss.

    Every process gets the same answer, so all stop together."""
    bad_step = torch.where(bad_step > 0, bad_step, n_steps + 1)
    dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)
    return bad_step % (n_steps + 1)

def why_broken(model, loss, bad_step):
    """Why training must stop (None: it goes on): a non-finite loss, or non-finite weights."""
    if bad_step:
        return f"step {bad_step}: the loss is {loss} (not finite)"
    weights = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not all(t.isfinite().all() for t in weights):
        return "the weights are not finite"
    return None

def stop_together(broken, device):
    """Why this process stops (or None) -> why any process stops.

    A process that stopped alone would leave the others waiting for it forever."""
    flag = torch.tensor(float(broken is not None), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag and broken is None:
        return "another process stopped (non-finite weights or scores there)"
    return broken

def check_rows(n, batch_size, where):
    """Refuse a set whose batches give a process under 2 rows (BatchNorm), or unequal ones."""
    if n < 2 * WORLD:
        what = f"use torchrun --nproc-per-node {n // 2} or fewer" if n >= 2 else "add images"
        raise DataError(f"{where}: {n} image(s), but {WORLD} process(es) need 2 each "
                        f"(BatchNorm); {what}")
    if n < batch_size and n % WORLD:   # the whole set is the one batch: it must split evenly
        raise DataError(f"{where}: {n} images fill less than one --batch-size {batch_size} and "
                        f"do not split evenly over {WORLD} processes; use --batch-size "
                        f"{n - n % WORLD}")

def data_parallel(model, device):
    """(model, its DDP) over torchrun's processes.

    NCCL: BatchNorm synced over them (SyncBatchNorm: N processes train as one). gloo has no
    SyncBatchNorm: each process's BatchNorm takes its statistics over its own rows."""
    if dist.get_backend() == "nccl":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None   # this process's one GPU
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

def start_process_group(device):
    """Under torchrun: this process's device (cuda:LOCAL_RANK, or cpu) and its process group."""
    local_rank = int(os.environ["LOCAL_RANK"])
    gpus = torch.cuda.device_count()
    if device != "cpu" and local_rank >= gpus:   # a GPU a process
        sys.exit(f"torchrun: {os.environ.get('LOCAL_WORLD_SIZE')} processes on this machine, "
                 f"which has {gpus} GPU(s); use --nproc-per-node {gpus} (or --device cpu)")
    if device != "cpu":   # NCCL and every kernel on this process's own GPU, not on GPU 0
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if device == "cpu" else "nccl")
    atexit.register(dist.destroy_process_group)   # at the end, and on every error's way out
    if RANK > 0:   # rank 0 alone prints
        sys.stdout = open(os.devnull, "w")
    return device

def load_resume(path, plain, *required):
    """The checkpoint of the killed run in --out, with the keys `required` besides the optimizer's
    and RNG's; refused unless this run continues it."""
    resume = load_checkpoint(path, ("optimizer", "rng", *required), plain, MAY_CHANGE)
    then = resume.get("world_size", WORLD)   # old checkpoints: unknown
    if then != WORLD:   # other BatchNorm batches: not the killed run's continuation
        sys.exit(f"--resume: {path} was trained by {then} process(es), this run has "
                 f"{WORLD} process(es); resume with torchrun --nproc-per-node {then}")
    return resume

def check_same_files(resume, path, **expected):
    """Refuse a --resume on other files than the killed run's: each of `expected` (the data's
    fingerprint, ...) must be the checkpoint's."""
    if any(resume.get(key) != value for key, value in expected.items()):
        sys.exit(f"--resume: {path} was trained on other files (images or masks changed since); "
                 f"start afresh")

def restore(resume, model, optimizer, scheduler, scaler):
    """Put the killed run's weights, optimizer, schedule, grad scale and RNG back."""
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    if resume["scaler"] and scaler.is_enabled():   # --amp may change: the fp16 scale if both
        scaler.load_state_dict(resume["scaler"])
    torch.set_rng_state(resume["rng"]["torch"])   # last: the loop draws the unbroken run's batches

def checkpoint_state(model, optimizer, scheduler, scaler, epoch, plain, log_rows, **more):
    """All a --resume needs, as one plain dict; `more`: this script's own keys."""
    return dict(
        model=model.state_dict(),   # the unwrapped model's: no DDP "module." prefix
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
        epoch=epoch,
        finished=False,
        args=plain,
        log_rows=log_rows,
        world_size=WORLD,
        rng={"torch": torch.get_rng_state()},   # CUDA's RNG: never drawn from
        **more,
    )

def load_data(args):
    """WBC_<split>/train and WBC_100/val; of these, the images with a mask (masks of WBC_100/val,
    or --holdout's share); the sets of --pretrain-on; and the epochs of WBC_<split>."""
    cache = None if args.cache == "none" else args.cache
    dirs = wbc_dirs(args.data, args.split)
    train_all = load_set(dirs["train_data"], args.size, None, [dirs["train_mask"]], cache,
                         args.skip_bad)
    val_all = load_set(dirs["val_data"], args.size, train_all.classes, [dirs["val_mask"]], cache,
                       args.skip_bad)
    labelled = train_all.subset(train_all.has_mask)
    held_out = val_all.subset(val_all.has_mask)
    wbc_100 = Path(args.data, "WBC_100", "train")   # the epochs rule's reference: its loaded pairs
    n_full = len(image_keys(wbc_100 / "data") & image_keys(wbc_100 / "mask")) or len(labelled)
    if not held_out and args.holdout and len(labelled) > 1:   # no masks in WBC_100/val
        labelled, held_out = hold_out(labelled, args.holdout, args.seed)
        n_full -= max(1, round(args.holdout * n_full))   # WBC_100 would hold out this share too
    sources = [mask_root(root, args.data) for root in args.pretrain_on]   # (images, masks)
    pre = []
    for data_dir, mask_dir in sources:
        pre_set = load_set(data_dir, args.size, None, [mask_dir], cache, args.skip_bad)
        pre.append(pre_set.subset(pre_set.has_mask))
    check_no_leakage(val_all, train_all, *pre)   # a val image in training: one line naming both
    mask_dirs = [dirs["train_mask"]] + [mask_dir for _, mask_dir in sources]
    for image_set, where in zip([labelled, *pre], mask_dirs):
        if len(image_set) < 2:   # BatchNorm cannot train on a batch of one
            raise DataError(f"{where}: {len(image_set)} mask(s) with an image of the same "
                            f"<Class>/<stem>; need 2")
    epochs = 1 if args.dry_run else max(1, round(args.epochs * n_full / len(labelled)))
    return train_all, val_all, labelled, held_out, pre, epochs

def score(model, image_sets, threshold, device, autocast):
    """{name: Dice, pixel error, ... of the masks drawn (probability >= threshold)} of every
    non-empty set."""
    scores = {}
    for name, image_set in image_sets.items():
        if not image_set:
            continue
        logits = infer(model, image_set.images, None, 64, device, autocast)   # (N, 1, S, S)
        cells = torch.sigmoid(logits) >= threshold
        scores[name] = mask_metrics(mask_counts(cells, image_set.masks > 0))
    return scores

def write_masks(model, image_sets, args, device, autocast):
    """A 0/255 mask of every image at its own size, --out/masks/<folder>/<Class>/<stem>.png, unless
    the UNet learned nothing. Written beside and swapped in whole: a kill leaves no masks, never a
    mix of two runs'."""
    probs = {}
    for folder, image_set in image_sets.items():
        logits = infer(model, image_set.images, None, 64, device, autocast)   # (N, 1, S, S)
        probs[folder] = torch.sigmoid(logits)
    if not args.dry_run:   # one batch never claims to have learned
        check_learned(probs.values(), args.threshold, args.out)
    new = args.out / ".masks.new"
    shutil.rmtree(new, ignore_errors=True)
    for folder, image_set in image_sets.items():
        rows = zip(image_set.paths, image_set.sizes, image_set.labels, probs[folder])
        for path, (w, h), label, prob in rows:   # prob (1, S, S)
            full = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)
            cell = full[0, 0] >= args.threshold   # (h, w); the rule of evaluate.py and predict.py
            save_mask_png(cell, new / folder / image_set.classes[label] / f"{path.stem}.png")
    shutil.rmtree(args.out / "masks", ignore_errors=True)
    os.replace(new, args.out / "masks")

def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")   # undecodable name bytes print as \udcff
    ddp = WORLD > 1   # torchrun: a process per device, each on its share of every batch
    if ddp:
        args.device = start_process_group(args.device)
        master_process = RANK == 0   # it alone prints and writes
    else:
        master_process = True
    device = torch.device(args.device)
    ckpt_path = args.out / "checkpoint.pt"
    torch.manual_seed(args.seed)   # shuffling, augmentation and init: torch's CPU RNG alone
    if args.amp == "auto":
        args.amp = pick_amp(device)
    autocast = torch.autocast(device.type, AMP_DTYPES[args.amp], enabled=args.amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")   # fp16 grads underflow
    torch.backends.cudnn.benchmark = True   # fixed-size batches: cuDNN times its kernels once
    torch.backends.cuda.matmul.allow_tf32 = True   # as cuDNN's convolutions: fp32-like, faster
    print(f"device {device} x {WORLD} | amp {args.amp} | size {args.size} | loss {args.loss} | "
          f"out {args.out}")
    if master_process:
        claim_folder(args.out)   # refuses a second live run on the same folder
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    resume = load_resume(ckpt_path, plain, "stage") if args.resume else None
    weights = None if resume else resnet34_state_dict(args.pretrained, args.weights)   # fail fast

    # 1. data: the masks of WBC_<split> (and of --pretrain-on), a held-out set, all images
    train_all, val_all, labelled, held_out, pre, epochs = load_data(args)
    fingerprint = " ".join([labelled.fingerprint] + [s.fingerprint for s in pre])
    if resume:
        check_same_files(resume, ckpt_path, fingerprint=fingerprint)

    # 2. model: a UNet whose encoder is a torchvision resnet34 (ImageNet, a file or random)
    model = UNet()
    load_backbone(model.encoder, weights, args.weights or "ImageNet weights")
    model = model.to(device, memory_format=torch.channels_last)   # NHWC: faster convolutions
    net = model
    if ddp:   # DDP starts every rank from rank 0's weights
        model, net = data_parallel(model, device)
    forward = torch.compile(net) if args.compile else net

    # 3. optimizer: a fresh Adam, cosine to 0, for each stage
    stages = stage_list(labelled, pre, epochs, resume, args)
    state = resume   # what a resumed run killed after its last epoch leaves
    log_rows = []
    saved = "no checkpoint had been saved yet"
    if resume:
        log_rows = resume["log_rows"]
        saved = f"the last good checkpoint is {ckpt_path}"
    if master_process:   # no old result stays beside this run's, no old masks pass for its own
        (args.out / "metrics.json").unlink(missing_ok=True)
        shutil.rmtree(args.out / "masks", ignore_errors=True)
    for stage, images, masks, stage_epochs in stages:
        print(f"{stage} on {len(images)} masks for {stage_epochs} epochs; {len(held_out)} held out")
        optimizer = adam(model, args.lr, device)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=stage_epochs)
        first = 1
        if resume and resume["stage"] == stage:   # the killed stage goes on where it stopped
            restore(resume, model, optimizer, scheduler, scaler)
            first = resume["epoch"] + 1
        # 4. loop; checkpoint.pt and log.csv every `every` epochs and at the end, if finite
        every = args.save_every or max(1, stage_epochs // 20)
        for epoch in range(first, stage_epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            loss, err, speed, bad_step = train_one_epoch(forward, model, images, masks, optimizer,
                                                         scaler, autocast, args)
            scheduler.step()   # per epoch
            at = f"{stage} epoch {epoch}/{stage_epochs}"
            broken = why_broken(model, loss, bad_step)
            if ddp:
                broken = stop_together(broken, device)
            if broken:
                sys.exit(f"error: {at} {broken}; stopped, {saved}. Try a lower --lr or --clip-grad")
            print(f"{at} | loss {loss:.4f} | pixel error {100 * err:.2f}% | lr {lr:.2e} | "
                  f"{speed:.0f} img/s", flush=True)
            log_rows.append(dict(stage=stage, epoch=epoch, loss=loss, pixel_error=err, lr=lr,
                                 img_s=speed))
            state = checkpoint_state(model, optimizer, scheduler, scaler, epoch, plain, log_rows,
                                     kind="masker", stage=stage, fingerprint=fingerprint)
            if master_process and (epoch % every == 0 or epoch == stage_epochs):
                save_checkpoint(state, ckpt_path)
                save_csv(log_rows, args.out / "log.csv")
                saved = f"the last good checkpoint is {ckpt_path} ({stage} epoch {epoch})"
    if not master_process:
        return None

    # 5. report: scores, masks, metrics; the finished checkpoint last (a kill before it: --resume)
    scores = score(model, {"train": labelled, "held_out": held_out}, args.threshold, device,
                   autocast)
    metrics = scores | dict(split=args.split, loss=args.loss, pretrain_on=args.pretrain_on,
                            n_masks=len(labelled), epochs=epochs)
    write_masks(model, {"train": train_all, "val": val_all}, args, device, autocast)
    save_json(metrics, args.out / "metrics.json")
    save_checkpoint(state | {"finished": True, "metrics": metrics}, ckpt_path)
    print(" | ".join(f"{name}: Dice {s['dice']:.3f}, pixel error {s['pixel_error']:.2%}"
                     for name, s in scores.items()))
    print(f"wrote checkpoint.pt, log.csv, metrics.json, masks/ "
          f"({len(train_all) + len(val_all)} images) to {args.out}")
    return metrics

if __name__ == "__main__":
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:   # nohup's ignored SIGHUP stays ignored
            signal.signal(signum, interrupt)
    try:
        main()
    except KeyboardInterrupt:   # Ctrl-C, or a signal as one: --resume goes on
        sys.exit("interrupted: --resume continues from the last checkpoint")
    except DataError as e:   # one line, not a traceback
        sys.exit(f"error: {e}")
