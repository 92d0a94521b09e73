"""Stage 2: train the ResNet34 WBC classifier, its loss optionally weighted by the cell masks.

    python train_classifier.py --alpha -1 1            # weight -1*mask + 1: the cell's surroundings
    python train_classifier.py --alpha 1 0 --balance   # only the cell (0 1: all), classes balanced
    torchrun --nproc-per-node 8 train_classifier.py --alpha -1 1   # 8 GPUs share each batch

Masks: ground truth where there is one, else train_masker.py's (--masks). Writes to --out:
checkpoint.pt (also every --save-every epochs, for --resume), log.csv and metrics.json (scores on
WBC_100/val). --holdout F keeps a stratified share F of the training images out of training: choose
settings on its scores, and its fitted temperature calibrates the probabilities evaluate.py and
predict.py give."""
import argparse
import atexit
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import (SPLITS, DataError, batch_indices, check_no_leakage, claim_folder, grow_mask,
                  grow_px, guide_for, image_keys, infer, load_checkpoint, load_set, make_batch,
                  save_checkpoint, save_csv, save_json, wbc_dirs)
from losses import (check_alpha, class_weights, classifier_scores, fit_temperature,
                    mask_weighted_ce, rrr_penalty, weighted_ce)
from resnet_cls import build_classifier, resnet34_state_dict

RANK = int(os.environ.get("RANK", 0))   # torchrun sets both
WORLD = int(os.environ.get("WORLD_SIZE", 1))
# the flags a --resume may change; any other must be the killed run's
MAY_CHANGE = ("cache", "skip_bad", "amp", "compile", "device", "out", "save_every", "resume")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data",
                   help="dataset root (ROOT/WBC_<split>/train, ROOT/WBC_100/val)")
    g.add_argument("--split", type=int, default=10, choices=SPLITS,
                   help="train on WBC_<split>/train")
    g.add_argument("--masks", help="masks MASKS/{train,val}/<Class>/<stem>.png "
                   "(default runs/masker_WBC_<split>/masks)")
    g.add_argument("--size", type=int, default=224, help="working size in px (>= 32)")
    g.add_argument("--cache", default=".cache/decoded",
                   help="decoded-image cache folder ('none' = off)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images (listed) instead of stopping")
    g.add_argument("--white-balance", action="store_true",
                   help="divide each image by its background's colour")
    g.add_argument("--holdout", type=float, default=0.0,
                   help="stratified share of the training images kept out: choose settings on "
                   "it; it fits the temperature (0 = none)")
    g = p.add_argument_group("mask guidance and model")
    g.add_argument("--alpha", type=float, nargs=2, metavar=("A1", "A2"),
                   help="loss weight A1*mask + A2 (none: CE)")
    g.add_argument("--mask-mode", default="loss", choices=("loss", "channel", "input", "crop"),
                   help="channel: mask as 4th input; input: background blanked; crop: the cell's "
                   "square (15%% margin) at --size")
    g.add_argument("--rrr", type=float, default=0.0, metavar="LAMBDA",
                   help="penalise the input gradient outside the mask (Ross et al. 2017)")
    g.add_argument("--balance", action="store_true",
                   help="class weights 1/count, rescaled to mean 1")
    weights = g.add_mutually_exclusive_group()   # each sets the starting weights
    weights.add_argument("--pretrained", action="store_true",
                         help="ImageNet init (torchvision download)")
    weights.add_argument("--weights", help="local torchvision resnet34 state dict to start from")
    weights.add_argument("--init", help="start from a checkpoint of ours (classifier or masker "
                         "encoder), fc dropped")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=14,
                   help="epochs on WBC_100 (smaller splits: same epochs x images)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="images per step, all processes together (>= 2 each)")
    g.add_argument("--lr", type=float, default=3e-3, help="Adam lr, halved at each 7th of the "
                   "run's steps: x0.5 ** floor(7 * step / steps); any --epochs gets 6 halvings")
    g.add_argument("--zoom", type=float, nargs=2, default=[0.75, 1.0],
                   help="crop side range (above 1 zooms out)")
    g.add_argument("--stain", type=float, default=0.0,
                   help="hue/saturation/grey augmentation strength in [0, 1]")
    g.add_argument("--blur", type=float, default=0.0,
                   help="largest Gaussian blur sigma in px (0 = off)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of shuffling, augmentation and init (>= 0)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast; auto: bf16 on GPUs of compute capability 8.0+ and CPUs with "
                   "bf16 instructions, fp16 + grad scaler on older GPUs, else off")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (slow first steps)")
    g.add_argument("--clip-grad", type=float, default=0.0,
                   help="clip the gradient norm to this (0 = off)")
    g.add_argument("--out", help="output folder (default runs/classifier_WBC_<split>_<setting>)")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N epochs (0 = about 20 per run)")
    g.add_argument("--resume", action="store_true",
                   help="continue the killed run in --out, with the same flags")
    g.add_argument("--dry-run", action="store_true",
                   help="one batch, one epoch, outputs under runs/dry_run")
    args = p.parse_args(argv)
    check_args(p, args)
    return args

def check_args(p, args):
    """One argparse error per broken rule, so the user reads which rule failed; settles
    --device, --masks and --out."""
    if args.batch_size % WORLD:   # every process gets an equal share
        p.error(f"--batch-size {args.batch_size}: need a multiple of the {WORLD} process(es)")
    if args.batch_size < 2 * WORLD:   # BatchNorm cannot train on one row
        p.error(f"need --batch-size 2+ (BatchNorm) x {WORLD} process(es)")
    if args.size < 32:
        p.error("need --size >= 32")
    if not 0 < args.lr < math.inf:
        p.error("need finite --lr > 0")
    if not 0 <= args.clip_grad < math.inf:
        p.error("need finite --clip-grad >= 0")
    if not 0 <= args.stain <= 1:
        p.error("need --stain in [0, 1]")
    if not 0 <= args.blur < math.inf:
        p.error("need finite --blur >= 0")
    if not 0 < args.zoom[0] <= args.zoom[1] < math.inf:
        p.error("need finite 0 < --zoom LO <= HI")
    if args.epochs < 1:
        p.error("need --epochs >= 1")
    if args.seed < 0 or args.save_every < 0:
        p.error("need --seed, --save-every >= 0")
    if not 0 <= args.holdout < 1:
        p.error("need --holdout in [0, 1)")
    if not 0 <= args.rrr < math.inf:
        p.error("need finite --rrr >= 0")
    if args.rrr and args.mask_mode != "loss":
        p.error("--rrr: with --mask-mode loss only (the input gradient of RGB pixels)")
    if args.alpha is not None and check_alpha(*args.alpha):   # e.g. negative weights
        p.error(f"--alpha: {check_alpha(*args.alpha)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: unknown (cpu, or cuda, cuda:1, ...)")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: not available here (no CUDA; use cpu)")
    runs = Path("runs/dry_run" if args.dry_run else "runs")   # never fed to a real run
    args.masks = Path(args.masks or runs / f"masker_WBC_{args.split}" / "masks")
    args.out = Path(args.out or runs / f"classifier_WBC_{args.split}_{setting_name(args)}")
    for folder in (args.masks, args.out):
        if folder.is_file():
            p.error(f"{folder}: a file where a folder belongs")

def setting_name(args):
    """Folder-friendly name of the setting: nomask, alpha-1_1, channel_alpha1_0, ..., + _balance,
    + _white."""
    name = "nomask"
    if args.alpha is not None:
        name = f"alpha{args.alpha[0]:g}_{args.alpha[1]:g}"
    if args.mask_mode != "loss":
        name = args.mask_mode if args.alpha is None else f"{args.mask_mode}_{name}"
    if args.rrr:
        name += f"_rrr{args.rrr:g}"
    return name + "_balance" * args.balance + "_white" * args.white_balance

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

def halving_schedule(optimizer, total_steps):
    """The lr x0.5 ** floor(7 * step / total_steps), stepped after every optimizer step: halved at
    each seventh of the run, 6 halvings for any epoch count."""
    def factor(step):
        return 0.5 ** math.floor(7 * step / total_steps)
    # a LambdaLR, not a StepLR: StepLR halves every whole number of steps (15 steps: every 2, 7
    # halvings); stepped per epoch, 5 epochs would skip two of the halvings
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

def check_masks(masks, where):
    """Refuse masks (N, 1, S, S) all empty or all cell: the masker that drew them learned
    nothing."""
    for what, wrong in (("empty", not masks.any()), ("all cell", masks.all())):
        if wrong:
            raise DataError(f"{where}: every mask is {what}; draw them again with train_masker.py "
                            f"(did it learn?) or train without --alpha and --mask-mode channel")

def train_one_epoch(forward, model, data, optimizer, scheduler, scaler, autocast, class_w, channel,
                    args):
    """One pass over `data` (one batch with --dry-run), this process on its share of each batch.
    Returns mean loss, accuracy, share of samples with mask weights summing to 0, img/s, 1-based
    step of the first non-finite loss (0: none)."""
    started = time.perf_counter()
    model.train()
    batches = batch_indices(len(data), args.batch_size, shuffle=True, drop_last=True)
    if args.dry_run:
        batches = batches[:1]
    totals = torch.zeros(3, device=args.device)   # sums on the device: no host syncs
    bad_step = torch.zeros((), device=args.device)
    aug = dict(zoom=args.zoom, stain=args.stain, blur=args.blur)
    guide = guide_for(args.mask_mode, args.size)
    # each process: its rows' loss over the whole batch's denominator (a sum over the processes)
    all_sum = sum_over_processes if WORLD > 1 else None
    for step, idx in enumerate(batches, 1):
        mine = slice(RANK * len(idx) // WORLD, (RANK + 1) * len(idx) // WORLD)   # my rows of it
        x, mask = make_batch(data.images, data.masks, idx, args.device, train=True, part=mine,
                             aug=aug, mask_channel=channel, white=args.white_balance, guide=guide)
        y = data.labels[idx[mine]].to(args.device, non_blocking=True)
        has_mask = None   # only --rrr reads it: no copy to the device otherwise
        if args.rrr:
            has_mask = data.has_mask[idx[mine]].to(args.device, non_blocking=True)
        loss, n_empty, logits = batch_loss(forward, x, y, mask, has_mask, autocast, class_w,
                                           all_sum, args)
        optimizer.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients: x WORLD, that is the gradient of the sum of shares
        scaler.scale(loss * WORLD).backward()
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()   # per step: the halvings fall at sevenths of the run, any epoch count
        correct = (logits.argmax(1) == y).sum()
        share = loss.detach() * len(idx)   # summed over the processes: the batch's loss x its size
        totals += torch.stack([share, correct, n_empty])
    if WORLD > 1:   # sums over every process; any process's bad step stops them all
        dist.all_reduce(totals)
        bad_step = first_over_processes(bad_step, len(batches))
    seen = sum(len(idx) for idx in batches)   # images (not only this process's)
    return (*(totals / seen).tolist(), seen / (time.perf_counter() - started), int(bad_step))

def batch_loss(forward, x, y, mask, has_mask, autocast, class_w, all_sum, args):
    """This process's share of the batch's loss, its samples whose mask weights sum to 0, and
    the pooled logits (B, C), detached."""
    if args.rrr:   # the penalty differentiates the prediction by the input pixels
        x.requires_grad_(True)
    with autocast:
        logit_map = forward(x, pooled=False).float()   # (B, C, h, w)
    logits = logit_map.mean((2, 3))   # (B, C): what inference sees
    n_empty = y.new_zeros(())
    if args.alpha:
        loss, n_empty = mask_weighted_ce(logit_map, y, mask, args.alpha, class_w, all_sum)
    else:
        loss = weighted_ce(logits, y, class_w, all_sum)
    if args.rrr:
        outside = 1 - grow_mask(mask, grow_px(args.size))
        penalty = rrr_penalty(logits, x, outside, has_mask, all_sum)
        loss = loss + args.rrr * penalty
    return loss, n_empty, logits.detach()

def sum_over_processes(t):
    """t summed over every torchrun process (an all-reduce; no host sync on NCCL)."""
    t = t.clone()
    dist.all_reduce(t)
    return t

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

def check_schedule(resume, steps, path):
    """Exit if the resumed checkpoint stepped its lr per epoch (an older train_classifier.py):
    its schedule cannot go on per step."""
    if resume and resume["scheduler"]["last_epoch"] != resume["epoch"] * steps:
        sys.exit(f"--resume: {path} is of an older train_classifier.py (lr stepped per epoch); "
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

def hold_out(train, share, seed):
    """(kept, held out): a seeded `share` of each class's images held out (rounded; each class
    keeps one for training). Its own generator: the training draws stay as without it."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(train), dtype=torch.bool)
    for label in train.labels.unique():
        rows = (train.labels == label).nonzero()[:, 0]
        n_held = min(round(share * len(rows)), len(rows) - 1)
        order = torch.randperm(len(rows), generator=generator)
        held[rows[order[:n_held]]] = True
    return train.subset(~held), train.subset(held)

def load_data(args, device):
    """WBC_<split>/train (with a mask for every image if the loss or input uses masks: ground truth
    first, then --masks'), less --holdout's share, that share (None without it), WBC_100/val, the
    epochs of WBC_<split> and its class weights (C,) (None without --balance)."""
    cache = None if args.cache == "none" else args.cache
    dirs = wbc_dirs(args.data, args.split)
    seen_masks = args.mask_mode != "loss"   # channel, input, crop: at training and test time
    need_masks = args.alpha is not None or seen_masks
    train_masks = [dirs["train_mask"], args.masks / "train"]
    if not need_masks and not args.rrr:   # --rrr: on the images that have a mask
        train_masks = []
    train = load_set(dirs["train_data"], args.size, None, train_masks, cache, args.skip_bad,
                     need_masks=need_masks)
    if len(train) < 2:   # BatchNorm cannot train on a batch of one
        raise DataError(f"{dirs['train_data']}: {len(train)} training image(s); BatchNorm needs 2")
    val_masks = [args.masks / "val"] if seen_masks else []
    val = load_set(dirs["val_data"], args.size, train.classes, val_masks, cache, args.skip_bad,
                   need_masks=seen_masks)
    check_no_leakage(val, train)   # a val image in training: one line naming both
    wbc_100 = Path(args.data, "WBC_100", "train", "data")   # the epochs rule's reference
    n_full = len(image_keys(wbc_100)) or len(train)   # the images the loader reads
    epochs = 1 if args.dry_run else max(1, round(args.epochs * n_full / len(train)))
    held = None
    n_held = 0
    if args.holdout:   # after the epochs rule: a held-out share does not lengthen the run
        train, held = hold_out(train, args.holdout, args.seed)
        n_held = len(held)
    if args.holdout and n_held == 0:   # no temperature to fit, no score to choose on
        raise DataError(f"{dirs['train_data']}: --holdout {args.holdout} holds out no image")
    counts = torch.bincount(train.labels, minlength=len(train.classes)).tolist()
    class_w = class_weights(counts).to(device) if args.balance else None
    print(f"train {len(train)} images {dict(zip(train.classes, counts))} | holdout {n_held} | "
          f"val {len(val)} | {epochs} epochs")
    if need_masks:
        check_masks(train.masks, f"{args.masks / 'train'} (after {dirs['train_mask']})")
    if seen_masks:   # the masker found no cell: the whole image is kept
        empty = (train.masks.amax((1, 2, 3)) == 0).sum().item()
        print(f"{args.mask_mode}: {empty} training image(s) with an empty mask, seen whole")
    check_rows(len(train), args.batch_size, dirs["train_data"])
    return train, held, val, epochs, class_w

def starting_weights(args):
    """The resnet34 state dict to start from: --init (our classifier's or masker's), --pretrained
    or --weights (torchvision's), or None (random init)."""
    if args.init:
        return load_checkpoint(args.init)["model"]
    return resnet34_state_dict(args.pretrained, args.weights)

def validate(model, val, channel, device, autocast, args):
    """Loss, accuracy and logits (N, C) on `val` (WBC_100/val or the holdout), pooled as
    inference sees it."""
    guide = guide_for(args.mask_mode, args.size)
    logits = infer(model, val.images, val.masks, args.batch_size * 2, device, autocast, channel,
                   args.white_balance, guide)   # (N, C)
    loss = F.cross_entropy(logits, val.labels).item()
    accuracy = (logits.argmax(1) == val.labels).float().mean().item()
    return loss, accuracy, logits

def score_holdout(model, held, channel, device, autocast, args):
    """(the holdout's scores, printed, and the temperature fitted on its logits); ({}, 1.0)
    without --holdout."""
    if held is None:
        return {}, 1.0
    _, _, logits = validate(model, held, channel, device, autocast, args)
    temperature = fit_temperature(logits, held.labels)
    metrics = classifier_scores(logits, held.labels, held.classes, temperature)
    print(f"holdout accuracy {metrics['accuracy']:.2%} | balanced "
          f"{metrics['balanced_accuracy']:.2%} | temperature {temperature:.3f}")
    return metrics, temperature

def why_scores_broken(val_loss, empty):
    """Why training must stop (None: it goes on): a non-finite validation loss, or every sample's
    mask weights summing to 0 (empty: their share)."""
    if not math.isfinite(val_loss):
        return f"the validation loss is {val_loss}"
    if empty == 1:
        return "every sample's mask weight (a1*m + a2) summed to 0: nothing to learn (empty masks?)"
    return None

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
    print(f"device {device} x {WORLD} | amp {args.amp} | size {args.size} | {setting_name(args)} | "
          f"out {args.out}")
    if master_process:
        claim_folder(args.out)   # refuses a second live run on the same folder
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    resume = load_resume(ckpt_path, plain, "fingerprint") if args.resume else None
    weights = None if resume else starting_weights(args)   # fail fast

    # 1. data: WBC_<split>/train with its masks (ground truth first, then generated), WBC_100/val
    train, held, val, epochs, class_w = load_data(args, device)
    if resume:
        check_same_files(resume, ckpt_path, fingerprint=train.fingerprint, classes=train.classes)

    # 2. model: ImageNet, a local file, our --init, or random: a resnet34 with a new fc
    channel = args.mask_mode == "channel"   # the mask as a 4th input channel
    model = build_classifier(len(train.classes), 4 if channel else 3, weights,
                             args.init or args.weights or "ImageNet")
    model = model.to(device, memory_format=torch.channels_last)   # NHWC: faster convolutions
    net = model
    if ddp:   # DDP starts every rank from rank 0's weights
        model, net = data_parallel(model, device)
    forward = torch.compile(net) if args.compile else net

    # 3. optimizer: Adam, its lr halved at each seventh of the run's steps
    optimizer = adam(model, args.lr, device)
    steps = 1 if args.dry_run else max(1, len(train) // args.batch_size)   # per epoch: drop_last
    scheduler = halving_schedule(optimizer, epochs * steps)
    check_schedule(resume, steps, ckpt_path)
    first = resume["epoch"] + 1 if resume else 1
    log_rows = []
    saved = "no checkpoint had been saved yet"
    if resume:
        log_rows = resume["log_rows"]
        saved = f"the last good checkpoint is {ckpt_path}"
        restore(resume, model, optimizer, scheduler, scaler)
    if master_process:   # no old result stays beside this run's
        (args.out / "metrics.json").unlink(missing_ok=True)

    # 4. loop; checkpoint.pt and log.csv every `every` epochs (~20 saves: WBC_1 runs 1000s)
    every = args.save_every or max(1, epochs // 20)
    started = time.perf_counter()
    for epoch in range(first, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss, acc, empty, speed, bad_step = train_one_epoch(
            forward, model, train, optimizer, scheduler, scaler, autocast, class_w, channel, args)
        val_loss, val_acc, val_logits = validate(model, val, channel, device, autocast, args)
        at = f"epoch {epoch}/{epochs}"
        broken = why_broken(model, loss, bad_step) or why_scores_broken(val_loss, empty)
        if ddp:
            broken = stop_together(broken, device)
        if broken:
            sys.exit(f"error: {at} {broken}; stopped, {saved}. Try a lower --lr or --clip-grad")
        eta = (time.perf_counter() - started) / (epoch - first + 1) * (epochs - epoch)
        print(f"{at} | train loss {loss:.4f} acc {acc:.2%} | val loss {val_loss:.4f} "
              f"acc {val_acc:.2%} | lr {lr:.2e} | {speed:.0f} img/s | ETA {eta:.0f}s", flush=True)
        log_rows.append(dict(epoch=epoch, train_loss=loss, train_acc=acc, val_loss=val_loss,
                             val_acc=val_acc, lr=lr, img_s=speed, empty_weight_share=empty))
        state = checkpoint_state(model, optimizer, scheduler, scaler, epoch, plain, log_rows,
                                 kind="classifier", epochs=epochs, classes=train.classes,
                                 fingerprint=train.fingerprint)
        if master_process and epoch % every == 0 and epoch < epochs:   # the last: with the report
            save_checkpoint(state, ckpt_path)
            save_csv(log_rows, args.out / "log.csv")
            saved = f"the last good checkpoint is {ckpt_path} (epoch {epoch})"
    if not master_process:
        return None

    # 5. report: the holdout's scores and temperature, then val's, in the finished checkpoint
    holdout, temperature = score_holdout(model, held, channel, device, autocast, args)
    metrics = classifier_scores(val_logits, val.labels, train.classes, temperature)
    metrics.update(split=args.split, setting=setting_name(args), epochs=epochs,
                   train_images=len(train), seconds=time.perf_counter() - started, amp=args.amp,
                   holdout=holdout)
    finished = {"finished": True, "metrics": metrics, "temperature": temperature}
    save_checkpoint(state | finished, ckpt_path)
    save_csv(log_rows, args.out / "log.csv")
    save_json(metrics, args.out / "metrics.json")
    print(f"val accuracy {metrics['accuracy']:.2%} | balanced {metrics['balanced_accuracy']:.2%} | "
          f"macro F1 {metrics['macro_f1']:.3f} | wrote checkpoint.pt, log.csv and metrics.json to "
          f"{args.out}")
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
