"""Stage 2: train the ResNet34 WBC classifier, its loss optionally weighted by the cell masks.

    python train_classifier.py --alpha -1 1            # loss weighted by (-1*mask + 1): the cell's surroundings
    python train_classifier.py --alpha 1 0 --balance   # only the cell (0 1: everywhere), classes balanced
    torchrun --nproc-per-node 8 train_classifier.py --alpha -1 1   # data-parallel: 8 GPUs share each batch

Masks: ground truth where there is one, else train_masker.py's (--masks). Writes to --out: checkpoint.pt (also
every --save-every epochs, for --resume), log.csv and metrics.json (scores on WBC_100/val)."""
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

from data import (SPLITS, DataError, batch_indices, check_no_leakage, claim_folder, image_keys,
                  infer,
                  load_checkpoint, load_set, make_batch, save_checkpoint, save_csv, save_json,
                  wbc_dirs)
from losses import check_alpha, class_weights, classification_metrics, confusion_matrix, mask_weighted_ce, weighted_ce
from resnet_cls import build_classifier, resnet34_state_dict

MAY_CHANGE = ("cache", "skip_bad", "amp", "compile", "device", "out", "save_every", "resume")   # on --resume; no other
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))   # torchrun sets them

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="dataset root (ROOT/WBC_<split>/train, ROOT/WBC_100/val)")
    g.add_argument("--split", type=int, default=10, choices=SPLITS, help="train on WBC_<split>/train")
    g.add_argument("--masks", help="masks MASKS/{train,val}/<Class>/<stem>.png (default runs/masker_WBC_<split>/masks)")
    g.add_argument("--size", type=int, default=224, help="working size in px (>= 32)")
    g.add_argument("--cache", default=".cache/decoded", help="decoded-image cache folder ('none' = off)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    g.add_argument("--white-balance", action="store_true", help="divide each image by its background's colour")
    g.add_argument("--zoom", type=float, nargs=2, default=[0.75, 1.0], help="crop side range (above 1 zooms out)")
    g.add_argument("--stain", type=float, default=0.0, help="hue/saturation/grey augmentation strength in [0, 1]")
    g.add_argument("--blur", type=float, default=0.0, help="largest Gaussian blur sigma in px (0 = off)")
    g = p.add_argument_group("mask guidance and model")
    g.add_argument("--alpha", type=float, nargs=2, metavar=("A1", "A2"), help="loss weight A1*mask + A2 (none: CE)")
    g.add_argument("--mask-mode", default="loss", choices=("loss", "channel"), help="channel: mask as 4th input")
    g.add_argument("--balance", action="store_true", help="class weights 1/count, rescaled to mean 1")
    start = g.add_mutually_exclusive_group()   # each sets the starting weights
    start.add_argument("--pretrained", action="store_true", help="ImageNet init (torchvision download)")
    start.add_argument("--weights", help="local torchvision resnet34 state dict to start from")
    start.add_argument("--init", help="start from a checkpoint of ours (classifier or masker encoder), fc dropped")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=14, help="epochs on WBC_100 (smaller splits: same epochs x images)")
    g.add_argument("--batch-size", type=int, default=32, help="images per step, all processes together (>= 2 each)")
    g.add_argument("--lr", type=float, default=3e-3, help="Adam lr, halved at each 7th of the "
                   "run's steps: x0.5 ** floor(7 * step / steps); any --epochs gets 6 halvings")
    g.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast; auto: bf16 on GPUs of compute capability 8.0+ and CPUs with "
                   "bf16 instructions, fp16 + grad scaler on older GPUs, else off")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    g.add_argument("--seed", type=int, default=0, help="seed of shuffling, augmentation and init (>= 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--out", help="output folder (default runs/classifier_WBC_<split>_<setting>)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N epochs (0 = about 20 per run)")
    g.add_argument("--resume", action="store_true", help="continue the killed run in --out, with the same flags")
    g.add_argument("--dry-run", action="store_true", help="one batch, one epoch, outputs under runs/dry_run")
    args = p.parse_args(argv)
    if args.alpha is not None and check_alpha(*args.alpha):
        p.error(f"--alpha: {check_alpha(*args.alpha)}")
    if args.batch_size < 2 * WORLD or args.batch_size % WORLD:   # equal shares, 2+ rows (BatchNorm)
        p.error(f"--batch-size {args.batch_size}: need a multiple of the {WORLD} process(es), "
                f"with 2 or more each (BatchNorm)")
    numbers = (0 < args.lr < math.inf, 0 <= args.clip_grad < math.inf, 0 <= args.stain <= 1, 0 <= args.blur < math.inf,
               0 < args.zoom[0] <= args.zoom[1] < math.inf, args.epochs >= 1, min(args.seed, args.save_every) >= 0,
               args.size >= 32, args.batch_size >= 2 * WORLD and args.batch_size % WORLD == 0)
    if not all(numbers):
        p.error(f"need finite --lr > 0, --clip-grad >= 0, --stain in [0, 1], --blur >= 0, 0 < --zoom LO <= HI, --epochs"
                f" >= 1, --seed, --save-every >= 0, --size >= 32, --batch-size 2+ (BatchNorm) x {WORLD} process(es)")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.split(":")[0] not in ("cpu", "cuda") or (args.device != "cpu" and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: not available here (cpu, or cuda, cuda:1, ... on a machine with CUDA)")
    runs = Path("runs/dry_run" if args.dry_run else "runs")   # a dry run's untrained files never feed a real run
    args.masks = Path(args.masks or runs / f"masker_WBC_{args.split}" / "masks")
    args.out = Path(args.out or runs / f"classifier_WBC_{args.split}_{setting_name(args)}")
    if args.masks.is_file() or args.out.is_file():
        p.error(f"{args.masks if args.masks.is_file() else args.out}: a file where a folder belongs")
    return args

def setting_name(args):
    """Folder-friendly name of the setting: nomask, alpha-1_1, channel_alpha1_0, ..., + _balance, + _white."""
    channel = "channel_" if args.mask_mode == "channel" else ""
    name = f"{channel}alpha{args.alpha[0]:g}_{args.alpha[1]:g}" if args.alpha is not None else channel[:-1] or "nomask"
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

def halving_schedule(optimizer, total_steps):
    """The lr x0.5 ** floor(7 * step / total_steps), stepped after every optimizer step: halved at
    each seventh of the run, 6 halvings for any epoch count (per epoch, 5 epochs would skip two)."""
    factor = lambda step: 0.5 ** math.floor(7 * step / total_steps)   # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

def train_one_epoch(forward, model, data, optimizer, scheduler, scaler, autocast, class_w, channel,
                    args):
    """One pass over `data` (one batch with --dry-run), this process on its share of each batch. Returns mean loss,
    accuracy, share of samples with mask weights summing to 0, img/s, 1-based step of the first non-finite loss."""
    model.train()
    totals, bad_step = torch.zeros(3, device=args.device), torch.zeros((), device=args.device)   # no host syncs
    batches = batch_indices(len(data), args.batch_size, shuffle=True, drop_last=True)[:1 if args.dry_run else None]
    start = time.perf_counter()
    for step, idx in enumerate(batches, 1):
        mine = slice(RANK * len(idx) // WORLD, (RANK + 1) * len(idx) // WORLD)   # this process's rows of the batch
        x, m = make_batch(data.images, data.masks, idx, args.device, train=True, mask_channel=channel, part=mine,
                          aug=dict(zoom=args.zoom, stain=args.stain, blur=args.blur), white=args.white_balance)
        y = data.labels[idx[mine]].to(args.device, non_blocking=True)
        with autocast:
            logit_map = forward(x, pooled=False).float()                  # (B, C, h, w)
        # loss: this process's share of the batch's loss, over the whole batch's denominator
        all_sum = sum_over_processes if WORLD > 1 else None
        if args.alpha:
            loss, n_empty = mask_weighted_ce(logit_map, y, m, args.alpha, class_w, all_sum)
        else:   # pooled (B, C): what inference sees
            pooled = logit_map.mean((2, 3))
            loss, n_empty = weighted_ce(pooled, y, class_w, all_sum), y.new_zeros(())
        optimizer.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients: x WORLD, that is the gradient of the sum of shares
        scaler.scale(loss * WORLD).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()   # per step: the halvings fall at sevenths of the run, any epoch count
        correct = (logit_map.detach().mean((2, 3)).argmax(1) == y).sum()
        shares = loss.detach() * len(idx)   # summed over the processes: the batch's loss x its size
        totals += torch.stack([shares, correct, n_empty])
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
    if WORLD > 1:   # sums over every process; any process's bad step stops them all
        dist.all_reduce(totals)
        bad_step = first_over_processes(bad_step, len(batches))
    seen = sum(len(idx) for idx in batches)   # images (not only this process's)
    return (*(totals / seen).tolist(), seen / (time.perf_counter() - start), int(bad_step))

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

def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")   # undecodable name bytes print as \udcff
    if WORLD > 1:   # torchrun: a process per device, each on its share of every batch; rank 0 alone prints and writes
        args.device = "cpu" if args.device == "cpu" else f"cuda:{os.environ['LOCAL_RANK']}"
        gpus = torch.cuda.device_count()
        if args.device != "cpu" and int(os.environ["LOCAL_RANK"]) >= gpus:   # a GPU a process
            sys.exit(f"torchrun: {os.environ.get('LOCAL_WORLD_SIZE')} processes on this machine, "
                     f"which has {gpus} GPU(s); use --nproc-per-node {gpus} (or --device cpu)")
        if args.device != "cpu":   # NCCL and every kernel on this process's own GPU, not on GPU 0
            torch.cuda.set_device(args.device)
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
        atexit.register(dist.destroy_process_group)   # at the end, and on every error's way out
        sys.stdout = sys.stdout if RANK == 0 else open(os.devnull, "w")
    device, channel, ckpt_path = torch.device(args.device), args.mask_mode == "channel", args.out / "checkpoint.pt"
    cuda, cache = device.type == "cuda", None if args.cache == "none" else args.cache
    if args.amp == "auto":
        args.amp = pick_amp(device)
    amp = args.amp
    autocast = torch.autocast(device.type, torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")   # fp16 gradients underflow without it
    torch.backends.cudnn.benchmark = True   # fixed-size batches: cuDNN times its kernels once, keeps the fastest
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32-like accuracy, faster
    torch.manual_seed(args.seed)   # shuffling, augmentation and init draw from torch's CPU RNG alone
    print(f"device {device} x {WORLD} | amp {amp} | size {args.size} | {setting_name(args)} | out {args.out}")
    claim_folder(args.out) if RANK == 0 else None   # refuses a second live run on the same folder
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}   # what a checkpoint keeps
    resume = load_checkpoint(ckpt_path, ("optimizer", "rng", "fingerprint"), plain, MAY_CHANGE) if args.resume else None
    then = resume.get("world_size", WORLD) if resume else WORLD   # old checkpoints: unknown
    if then != WORLD:   # other BatchNorm batches: not the killed run's continuation
        sys.exit(f"--resume: {ckpt_path} was trained by {then} process(es), this run has "
                 f"{WORLD} process(es); resume with torchrun --nproc-per-node {then}")
    start = None if resume else load_checkpoint(args.init)["model"] if args.init else \
        resnet34_state_dict(args.pretrained, args.weights)   # starting weights read before any decoding: fail fast

    # 1. data: WBC_<split>/train with its masks (ground truth first, then generated), and WBC_100/val
    dirs, need = wbc_dirs(args.data, args.split), args.alpha is not None or channel   # need: a mask for every image
    train = load_set(dirs["train_data"], args.size, None, [dirs["train_mask"], args.masks / "train"] if need else [],
                     cache, args.skip_bad, need_masks=need)
    if len(train) < 2:   # BatchNorm cannot train on a batch of one
        raise DataError(f"{dirs['train_data']}: {len(train)} training image(s); BatchNorm needs 2")
    val = load_set(dirs["val_data"], args.size, train.classes, [args.masks / "val"] if channel else [], cache,
                   args.skip_bad, need_masks=channel)
    check_no_leakage(val, train)   # a val image in training: one line naming both
    wbc_100 = Path(args.data, "WBC_100", "train", "data")   # the epochs rule's reference
    n_full = len(image_keys(wbc_100)) or len(train)   # the images the loader reads
    epochs = 1 if args.dry_run else max(1, round(args.epochs * n_full / len(train)))   # same epochs x images
    counts = torch.bincount(train.labels, minlength=len(train.classes)).tolist()
    class_w = class_weights(counts).to(device) if args.balance else None
    print(f"train {len(train)} images {dict(zip(train.classes, counts))} | val {len(val)} | {epochs} epochs")
    if need and (not train.masks.any() or train.masks.all()):   # a masker that learned nothing
        what = "empty" if not train.masks.any() else "all cell"
        raise DataError(f"{args.masks / 'train'} (after {dirs['train_mask']}): every mask is "
                        f"{what}; draw them again with train_masker.py (did it learn?) or train "
                        f"without --alpha and --mask-mode channel")
    check_rows(len(train), args.batch_size, dirs["train_data"])
    if resume and (resume["fingerprint"] != train.fingerprint or resume.get("classes") != train.classes):
        sys.exit(f"--resume: {ckpt_path} was trained on other files (images or masks changed since); start afresh")

    # 2. model: ImageNet, a local file, our classifier's or masker's resnet34 (--init), or random (resumed: its own)
    model = build_classifier(len(train.classes), 4 if channel else 3, start, args.init or args.weights or "ImageNet")
    model = model.to(device, memory_format=torch.channels_last)   # NHWC: faster convolutions on GPUs and CPUs
    net = model
    if WORLD > 1:   # same init on every rank
        model, net = data_parallel(model, device)
    forward = torch.compile(net) if args.compile else net

    # 3. optimizer; LambdaLR stepped per step: 7 equal segments, each at half the lr of the last
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=cuda or None, foreach=not cuda or None)
    batches = batch_indices(len(train), args.batch_size, shuffle=False, drop_last=True)   # no RNG
    steps = len(batches)   # per epoch
    if args.dry_run:
        steps = 1
    scheduler = halving_schedule(optimizer, epochs * steps)
    first, log_rows, saved = 1, [], "no checkpoint had been saved yet"
    (args.out / "metrics.json").unlink(missing_ok=True) if RANK == 0 else None   # no old result beside this run's
    if resume and resume["scheduler"]["last_epoch"] != resume["epoch"] * steps:   # older: per epoch
        sys.exit(f"--resume: {ckpt_path} is of an older train_classifier.py (lr stepped per "
                 f"epoch); start afresh")
    if resume:
        for part, name in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler")):
            part.load_state_dict(resume[name])
        if resume["scaler"] and scaler.is_enabled():   # --amp may change: fp16 scale if both
            scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])   # last: the loop draws the same batches as an unbroken run
        first, log_rows, saved = resume["epoch"] + 1, resume["log_rows"], f"the last good checkpoint is {ckpt_path}"

    # 4. loop; checkpoint.pt and log.csv updated every `every` epochs (~20 saves: WBC_1 runs 1000s), from finite weights
    every, start = args.save_every or max(1, epochs // 20), time.perf_counter()
    for epoch in range(first, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss, acc, empty, speed, bad_step = train_one_epoch(
            forward, model, train, optimizer, scheduler, scaler, autocast, class_w, channel, args)
        logits = infer(model, val.images, val.masks, args.batch_size * 2, device, autocast, channel, args.white_balance)
        val_loss, preds = torch.nn.functional.cross_entropy(logits, val.labels).item(), logits.argmax(1)
        val_acc = (preds == val.labels).float().mean().item()
        finite = all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point())
        broken = (f"step {bad_step}: the loss is {loss} (not finite)" if bad_step else
                  "the weights are not finite" if not finite else
                  f"the validation loss is {val_loss}" if not math.isfinite(val_loss) else
                  "every sample's mask weight (a1*m + a2) summed to 0: nothing to learn (empty masks?)" if empty == 1
                  else None)
        if WORLD > 1:
            broken = stop_together(broken, device)
        if broken:
            sys.exit(f"error: epoch {epoch}/{epochs} {broken}; stopped, {saved}. Try a lower --lr or --clip-grad")
        eta = (time.perf_counter() - start) / (epoch - first + 1) * (epochs - epoch)
        print(f"epoch {epoch}/{epochs} | train loss {loss:.4f} acc {100 * acc:.2f}% | val loss {val_loss:.4f} "
              f"acc {100 * val_acc:.2f}% | lr {lr:.2e} | {speed:.0f} img/s | ETA {eta:.0f}s", flush=True)
        log_rows.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_loss": val_loss,
                         "val_acc": val_acc, "lr": lr, "img_s": speed, "empty_weight_share": empty})
        state = dict(kind="classifier", model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch,
                     scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), epochs=epochs, args=plain,
                     finished=epoch == epochs, log_rows=log_rows, classes=train.classes, fingerprint=train.fingerprint,
                     rng={"torch": torch.get_rng_state()},   # CUDA's RNG: never drawn from
                     world_size=WORLD)
        if epoch % every == 0 and epoch < epochs and RANK == 0:   # the last epoch's is saved with the report
            save_checkpoint(state, ckpt_path)
            save_csv(log_rows, args.out / "log.csv")
            saved = f"the last good checkpoint is {ckpt_path} (epoch {epoch})"
    if RANK > 0:
        return None

    # 5. report, and the final checkpoint with it
    metrics = classification_metrics(confusion_matrix(val.labels, preds, len(train.classes)), train.classes)
    metrics.update(split=args.split, setting=setting_name(args), epochs=epochs, train_images=len(train),
                   seconds=time.perf_counter() - start, amp=amp)
    save_checkpoint(state | {"metrics": metrics}, ckpt_path)
    save_csv(log_rows, args.out / "log.csv")
    save_json(metrics, args.out / "metrics.json")
    print(f"val accuracy {100 * metrics['accuracy']:.2f}% | balanced {100 * metrics['balanced_accuracy']:.2f}% | "
          f"macro F1 {metrics['macro_f1']:.3f} | wrote checkpoint.pt, log.csv and metrics.json to {args.out}")
    return metrics

if __name__ == "__main__":
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:   # nohup's ignored SIGHUP stays ignored
            signal.signal(signum, interrupt)
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: --resume continues from the last checkpoint")
    except DataError as e:
        sys.exit(f"error: {e}")
