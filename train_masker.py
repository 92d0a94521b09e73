"""Stage 1: train the UNet mask generator, then draw a mask for every image.

    python train_masker.py --split 10                              # WBC_10's masks, center loss, 224 px
    python train_masker.py --split 100 --pretrain-on data/CAM16    # any roots with masks first, then WBC_100's

Writes to --out: checkpoint.pt (also every --save-every epochs, for --resume), log.csv, metrics.json and
masks/{train,val}/<Class>/<stem>.png (0/255, at each image's size) of WBC_<split>/train and WBC_100/val."""
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

from data import (SPLITS, DataError, batch_indices, check_no_leakage, claim_folder, image_keys,
                  infer,
                  load_checkpoint, load_set, make_batch, mask_root, save_checkpoint, save_csv,
                  save_json, save_mask_png, wbc_dirs)
from losses import MASKER_LOSSES, mask_counts, mask_metrics
from resnet_cls import load_backbone, resnet34_state_dict
from unet import UNet

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))   # torchrun sets them
MAY_CHANGE = ("cache", "skip_bad", "amp", "compile", "device", "out", "save_every", "resume", "threshold")   # --resume

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="dataset root (ROOT/WBC_<split>/train, ROOT/WBC_100/val)")
    g.add_argument("--split", type=int, default=10, choices=SPLITS, help="fine-tune on the masks of WBC_<split>")
    g.add_argument("--size", type=int, default=224, help="working size in px (a multiple of 32)")
    g.add_argument("--holdout", type=float, default=0.0, help="share of masks held out if WBC_100/val/mask is missing")
    g.add_argument("--cache", default=".cache/decoded", help="decoded-image cache folder ('none' = off)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    g = p.add_argument_group("pretraining")
    g.add_argument("--pretrain-on", nargs="+", default=[], metavar="ROOT", help="first train on the masks of all ROOTs "
                   "together: ROOT/train (e.g. data/CAM16), ROOT/WBC_100/train or ROOT/CAM16/train")
    g.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of pretraining")
    g.add_argument("--replay", type=int, default=0, metavar="N", help="fine-tune on those too, the split's N times")
    start = g.add_mutually_exclusive_group()   # each sets the encoder's starting weights
    start.add_argument("--pretrained", action="store_true", help="ImageNet encoder (torchvision download)")
    start.add_argument("--weights", help="local torchvision resnet34 state dict for the encoder")
    g = p.add_argument_group("training")
    g.add_argument("--loss", default="center", choices=sorted(MASKER_LOSSES), help="center-weighted or plain BCE")
    g.add_argument("--epochs", type=int, default=40, help="epochs for WBC_100's masks; smaller splits get more")
    g.add_argument("--batch-size", type=int, default=16, help="images per step, all processes together (>= 2 each)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 0 in each stage)")
    g.add_argument("--threshold", type=float, default=0.5, help="cell: probability >= this")
    g.add_argument("--zoom", type=float, nargs=2, default=[0.75, 1.0], help="crop side range (above 1 zooms out)")
    g.add_argument("--stain", type=float, default=0.0, help="hue/saturation/grey augmentation strength in [0, 1]")
    g.add_argument("--blur", type=float, default=0.0, help="largest Gaussian blur sigma in px (0 = off)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of shuffling, augmentation, init and --holdout (>= 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"), help="autocast; auto: bf16 on "
                   "GPUs of compute capability 8.0+ and CPUs with bf16 instructions, fp16 + grad "
                   "scaler on older GPUs, else off")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--out", help="output folder (default runs/masker_WBC_<split>)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N epochs (0 = about 20 per stage)")
    g.add_argument("--resume", action="store_true", help="continue the killed run in --out, with the same flags")
    g.add_argument("--dry-run", action="store_true", help="one batch, one epoch a stage, outputs under runs/dry_run")
    args = p.parse_args(argv)
    if args.batch_size < 2 * WORLD or args.batch_size % WORLD:   # equal shares, 2+ rows (BatchNorm)
        p.error(f"--batch-size {args.batch_size}: need a multiple of the {WORLD} process(es), "
                f"with 2 or more each (BatchNorm)")
    numbers = (args.size >= 32 and args.size % 32 == 0, args.lr > 0, args.clip_grad >= 0, 0 <= args.threshold <= 1,
               0 <= args.holdout < 1, 0 <= args.stain <= 1, args.blur >= 0, 0 < args.zoom[0] <= args.zoom[1],
               min(args.epochs, args.pretrain_epochs, args.seed + 1, args.save_every + 1) >= 1, args.replay >= 0,
               args.batch_size >= 2 * WORLD and args.batch_size % WORLD == 0, bool(args.pretrain_on) or not args.replay)
    if not all(numbers) or not all(map(math.isfinite, (args.lr, args.clip_grad, args.blur, *args.zoom))):
        p.error(f"need --size a multiple of 32 (the UNet), finite --lr > 0, --clip-grad >= 0, --threshold in [0, 1], "
                f"--holdout in [0, 1), --stain in [0, 1], --blur >= 0, 0 < --zoom LO <= HI, --epochs, --pretrain-epochs"
                f" >= 1, --seed, --save-every >= 0, --replay >= 0 with --pretrain-on, --batch-size 2+ (BatchNorm) x "
                f"{WORLD} process(es)")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.split(":")[0] not in ("cpu", "cuda") or (args.device != "cpu" and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: not available here (cpu, or cuda, cuda:1, ... on a machine with CUDA)")
    args.out = Path(args.out or Path("runs/dry_run" if args.dry_run else "runs") / f"masker_WBC_{args.split}")
    return args

def pick_amp(device):
    """The --amp auto rule: bf16 where `device` computes it natively, fp16 on older GPUs, else
    off."""
    if device.type == "cuda":   # not is_bf16_supported(): True on a T4, which emulates bf16 slowly
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        return "bf16" if native_bf16 else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "off"

def interrupt(signum, frame):   # SIGTERM (kill, a scheduler), SIGHUP (a closed terminal): as Ctrl-C
    raise KeyboardInterrupt

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

def train_one_epoch(forward, model, images, masks, optimizer, scaler, autocast, args):
    """One pass over uint8 images (N, 3, S, S), masks (N, 1, S, S) (one batch with --dry-run), this process on its
    share of each batch. Returns loss, pixel error, img/s, the 1-based step of the first non-finite loss (0: none)."""
    start = time.perf_counter()
    model.train()
    batches = batch_indices(len(images), args.batch_size, shuffle=True, drop_last=True)[:1 if args.dry_run else None]
    totals, bad_step = torch.zeros(2, device=args.device), torch.zeros((), device=args.device)   # no host syncs
    for step, idx in enumerate(batches, 1):
        mine = slice(RANK * len(idx) // WORLD, (RANK + 1) * len(idx) // WORLD)   # this process's rows of the batch
        x, m = make_batch(images, masks, idx, args.device, train=True, part=mine,
                          aug=dict(zoom=args.zoom, stain=args.stain, blur=args.blur))
        with autocast:
            logits = forward(x)                                            # (B, 1, S, S)
        loss = MASKER_LOSSES[args.loss](logits, m)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()          # the scaler is a no-op unless --amp fp16; DDP averages the gradients
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        wrong = (logits.detach() >= 0) != m.bool()   # logit >= 0: probability >= 0.5 is cell
        totals += torch.stack([loss.detach(), wrong.float().mean()]) * len(m)   # sums
    if WORLD > 1:   # sums over every process; any process's bad step stops them all
        dist.all_reduce(totals)
        bad_step = first_over_processes(bad_step, len(batches))
    seen = sum(len(idx) for idx in batches)
    return (*(totals / seen).tolist(), seen / (time.perf_counter() - start), int(bad_step))

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
    device, ckpt_path, cuda = torch.device(args.device), args.out / "checkpoint.pt", args.device != "cpu"
    cache = None if args.cache == "none" else args.cache
    torch.manual_seed(args.seed)   # shuffling, augmentation and init draw from torch's CPU RNG alone
    if args.amp == "auto":
        args.amp = pick_amp(device)
    amp = args.amp
    autocast = torch.autocast(device.type, torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")   # fp16 gradients underflow without it
    print(f"device {device} x {WORLD} | amp {amp} | size {args.size} | loss {args.loss} | out {args.out}")
    claim_folder(args.out) if RANK == 0 else None   # refuses a second live run on the same folder
    args.plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}   # what a checkpoint keeps
    resume = load_checkpoint(ckpt_path, ("optimizer", "rng", "stage"), args.plain, MAY_CHANGE) if args.resume else None
    then = resume.get("world_size", WORLD) if resume else WORLD   # old checkpoints: unknown
    if then != WORLD:   # other BatchNorm batches: not the killed run's continuation
        sys.exit(f"--resume: {ckpt_path} was trained by {then} process(es), this run has "
                 f"{WORLD} process(es); resume with torchrun --nproc-per-node {then}")
    weights = resnet34_state_dict(args.pretrained, args.weights) if not resume else None   # before any decoding

    # 1. data: the masks of WBC_<split> (and of --pretrain-on), a held-out set, every image to draw a mask for
    dirs, sources = wbc_dirs(args.data, args.split), [mask_root(root, args.data) for root in args.pretrain_on]
    train_all = load_set(dirs["train_data"], args.size, None, [dirs["train_mask"]], cache, args.skip_bad)
    val_all = load_set(dirs["val_data"], args.size, train_all.classes, [dirs["val_mask"]], cache, args.skip_bad)
    labelled, held_out = train_all.subset(train_all.has_mask), val_all.subset(val_all.has_mask)
    wbc_100 = Path(args.data, "WBC_100", "train")   # the epochs rule's reference: its loaded pairs
    n_full = len(image_keys(wbc_100 / "data") & image_keys(wbc_100 / "mask")) or len(labelled)
    if not held_out and args.holdout and len(labelled) > 1:   # no masks in WBC_100/val: a seeded share held out
        order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(args.seed))
        keep = order >= max(1, round(args.holdout * len(labelled)))
        held_out, labelled = labelled.subset(~keep), labelled.subset(keep)
        n_full -= max(1, round(args.holdout * n_full))   # WBC_100 would hold out this share too
    pre = [s.subset(s.has_mask) for s in (load_set(d, args.size, None, [m], cache, args.skip_bad) for d, m in sources)]
    check_no_leakage(val_all, train_all, *pre)   # a val image in training: one line naming both
    for n, where in ((len(labelled), dirs["train_mask"]), *((len(s), src[1]) for s, src in zip(pre, sources))):
        if n < 2:   # BatchNorm cannot train on a batch of one
            raise DataError(f"{where}: {n} mask(s) with an image of the same <Class>/<stem>; need 2")
    args.fingerprint = " ".join([labelled.fingerprint] + [s.fingerprint for s in pre])
    if resume and resume["fingerprint"] != args.fingerprint:
        sys.exit(f"--resume: {ckpt_path} was trained on other files (images or masks changed since); start afresh")
    epochs = 1 if args.dry_run else max(1, round(args.epochs * n_full / len(labelled)))   # same epochs x images

    # 2. model: a UNet whose encoder is a torchvision resnet34 (ImageNet or a file, or random; resumed: its own)
    model = UNet()
    load_backbone(model.encoder, weights, args.weights or "ImageNet weights")   # weights None: random init
    model = model.to(device, memory_format=torch.channels_last)   # NHWC: faster convolutions on GPUs and CPUs
    net = model
    if WORLD > 1:   # same init on every rank
        model, net = data_parallel(model, device)
    forward = torch.compile(net) if args.compile else net
    torch.backends.cudnn.benchmark = True   # fixed-size batches: cuDNN times its kernels once, keeps the fastest
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32-like accuracy, faster

    # 3. optimizer: a fresh Adam for each stage (the union of --pretrain-on's masks, then WBC_<split>'s), cosine to 0
    cat = lambda sets: (torch.cat([s.images for s in sets]), torch.cat([s.masks for s in sets]))   # noqa: E731
    stages = [("pretrain", *cat(pre), 1 if args.dry_run else args.pretrain_epochs)] if pre else []
    stages += [("wbc", *cat([labelled] * max(1, args.replay) + pre * (args.replay > 0)), epochs)]   # --replay: pre too
    where = {"pretrain": f"--pretrain-on {' '.join(args.pretrain_on)}", "wbc": dirs["train_mask"]}
    for stage, images, *_ in stages:
        check_rows(len(images), args.batch_size, where[stage])
    if resume:   # a resumed run goes on from the stage it was killed in
        names = [name for name, *_ in stages]
        stages = stages[names.index(resume["stage"]):]
    log_rows, state = resume["log_rows"] if resume else [], resume   # state: what a resumed, ended stage leaves
    saved = f"the last good checkpoint is {ckpt_path}" if resume else "no checkpoint had been saved yet"
    if RANK == 0:   # no old result stays beside this run's files, and no old masks pass for this run's if it is killed
        (args.out / "metrics.json").unlink(missing_ok=True)
        shutil.rmtree(args.out / "masks", ignore_errors=True)
    for stage, images, masks, stage_epochs in stages:
        print(f"{stage} on {len(images)} masks for {stage_epochs} epochs; {len(held_out)} held out")
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=cuda or None, foreach=not cuda or None)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=stage_epochs)
        resumed = resume is not None and resume["stage"] == stage   # the killed stage goes on where it stopped
        if resumed:
            for obj, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler")):
                obj.load_state_dict(resume[key])
            if resume["scaler"] and scaler.is_enabled():   # --amp may change: fp16 scale if both
                scaler.load_state_dict(resume["scaler"])
            torch.set_rng_state(resume["rng"]["torch"])   # last: the loop draws the same batches as an unbroken run
        # 4. loop; checkpoint.pt and log.csv every --save-every epochs and at the stage's end, from finite weights
        for epoch in range(resume["epoch"] + 1 if resumed else 1, stage_epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            loss, err, speed, bad = train_one_epoch(forward, model, images, masks, optimizer, scaler, autocast, args)
            scheduler.step()
            tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
            broken = None
            if not all(t.isfinite().all() for t in tensors):
                broken = "the weights are not finite"
            if bad:
                broken = f"step {bad}: the loss is {loss} (not finite)"
            if WORLD > 1:
                broken = stop_together(broken, device)
            if broken:
                sys.exit(f"error: {stage} epoch {epoch}/{stage_epochs} {broken}; stopped, {saved}")
            print(f"{stage} epoch {epoch}/{stage_epochs} | loss {loss:.4f} | pixel error {100 * err:.2f}% | "
                  f"lr {lr:.2e} | {speed:.0f} img/s", flush=True)
            log_rows.append(dict(stage=stage, epoch=epoch, loss=loss, pixel_error=err, lr=lr, img_s=speed))
            state = dict(kind="masker", stage=stage, epoch=epoch, finished=False, args=args.plain,
                         world_size=WORLD, log_rows=log_rows,
                         fingerprint=args.fingerprint, rng={"torch": torch.get_rng_state()}, model=model.state_dict(),
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict())
            if (epoch % (args.save_every or max(1, stage_epochs // 20)) == 0 or epoch == stage_epochs) and RANK == 0:
                save_checkpoint(state, ckpt_path)
                save_csv(log_rows, args.out / "log.csv")
                saved = f"the last good checkpoint is {ckpt_path} ({stage} epoch {epoch})"

    if RANK > 0:
        return None

    # 5. report: scores; a 0/255 mask of every image at its own size, written beside and swapped in whole
    scores = {name: mask_metrics(mask_counts(torch.sigmoid(infer(model, s.images, None, 64, device, autocast))
                                             >= args.threshold, s.masks > 0))
              for name, s in (("train", labelled), ("held_out", held_out)) if s}
    metrics = scores | dict(split=args.split, loss=args.loss, pretrain_on=args.pretrain_on, n_masks=len(labelled),
                            epochs=epochs)
    parts = {"train": train_all, "val": val_all}
    probs = {}
    for part, image_set in parts.items():
        logits = infer(model, image_set.images, None, 64, device, autocast)   # (N, 1, S, S)
        probs[part] = torch.sigmoid(logits)
    if not args.dry_run:   # one batch never claims to have learned
        check_learned(probs.values(), args.threshold, args.out)
    shutil.rmtree(new := args.out / ".masks.new", ignore_errors=True)
    for part, image_set in parts.items():
        prob = probs[part]   # (N, 1, S, S)
        for i, (path, (w, h), y) in enumerate(zip(image_set.paths, image_set.sizes, image_set.labels)):
            full = torch.nn.functional.interpolate(prob[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)
            cell = full[0, 0] >= args.threshold   # the rule of evaluate.py and predict.py
            save_mask_png(cell, new / part / image_set.classes[y] / f"{path.stem}.png")
    shutil.rmtree(args.out / "masks", ignore_errors=True)   # a kill here leaves no masks, never a mix of two runs'
    os.replace(new, args.out / "masks")
    save_json(metrics, args.out / "metrics.json")
    finished = state | {"finished": True, "metrics": metrics}
    save_checkpoint(finished, ckpt_path)   # last: a run killed before this can --resume
    print(" | ".join(f"{k}: Dice {m['dice']:.3f}, pixel error {m['pixel_error']:.2%}" for k, m in scores.items()))
    print(f"wrote checkpoint.pt, log.csv, metrics.json, masks/ ({len(train_all) + len(val_all)} images) to {args.out}")
    return metrics

if __name__ == "__main__":
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:   # nohup's ignored SIGHUP stays ignored
            signal.signal(signum, interrupt)
    try:
        main()
    except (DataError, KeyboardInterrupt) as e:   # one line, not a traceback; Ctrl-C: --resume goes on
        sys.exit(f"error: {e}" if isinstance(e, DataError) else
                 "interrupted: --resume continues from the last checkpoint")
