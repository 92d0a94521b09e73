"""Stage 1: train the UNet mask generator, then draw a mask for every image.

    python train_masker.py --split 10                              # WBC_10's masks, center loss, 224 px
    python train_masker.py --split 100 --pretrain-on data/CAM16    # CAM16's masks first, then WBC_100's

--pretrain-on takes any roots with masks: a CAM16 folder, another WBC dataset (its WBC_100/train), a
synthetic set; it trains on their union, then fine-tunes on WBC_<split>'s masks. Writes to --out:
checkpoint.pt (also every --save-every epochs, for --resume), log.csv, metrics.json, and
masks/{train,val}/<Class>/<stem>.png (0/255, each image's own size) for every image of WBC_<split>/train
and WBC_100/val, which train_classifier.py reads. The masks folder is swapped in whole, so it always
holds one run's masks.
"""
import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (SPLITS, DataError, batch_indices, claim_folder, infer, load_checkpoint, load_set, make_batch,
                  save_checkpoint, save_csv, save_json, save_mask_png, wbc_dirs)
from losses import MASKER_LOSSES, mask_counts, mask_metrics
from resnet_cls import load_backbone, resnet34_state_dict
from unet import UNet

SAME_FOR_RESUME = ("data", "split", "size", "holdout", "loss", "pretrain_on", "pretrain_epochs", "pretrained",
                   "weights", "epochs", "batch_size", "lr", "seed", "clip_grad", "dry_run")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="dataset root (ROOT/WBC_<split>/train, ROOT/WBC_100/val)")
    g.add_argument("--split", type=int, default=10, choices=SPLITS, help="fine-tune on the masks of WBC_<split>")
    g.add_argument("--size", type=int, default=224, help="working size in px (a multiple of 32)")
    g.add_argument("--holdout", type=float, default=0.0, help="fraction of the masks held out for scoring, when "
                                                              "WBC_100/val/mask does not exist")
    g.add_argument("--cache", default=".cache/decoded", help="decoded-image cache folder ('none' = off)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    g = p.add_argument_group("model and loss")
    g.add_argument("--loss", default="center", choices=sorted(MASKER_LOSSES), help="center-weighted or plain BCE")
    g.add_argument("--pretrain-on", nargs="+", default=[], metavar="ROOT", help="pretrain on the masks of these "
                   "roots first: ROOT/train/{data,mask} (e.g. data/CAM16), or ROOT/WBC_100/train of a WBC dataset")
    g.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of pretraining")
    g.add_argument("--pretrained", action="store_true", help="ImageNet encoder (torchvision download)")
    g.add_argument("--weights", help="local torchvision resnet34 state dict for the encoder")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=40, help="epochs for WBC_100's masks; smaller splits get more")
    g.add_argument("--batch-size", type=int, default=16, help="images per step (>= 2: BatchNorm)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 0 in each stage)")
    g.add_argument("--threshold", type=float, default=0.5, help="probability above which a pixel is cell")
    g.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"), help="autocast; auto: bf16 on CUDA "
                   "(fp16 + grad scaler without bf16) and on CPUs with bf16 instructions, else off")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    g.add_argument("--seed", type=int, default=0, help="seed of shuffling, augmentation, init and --holdout (>= 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    g.add_argument("--out", help="output folder (default runs/masker_WBC_<split>)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N epochs (0 = about 20 per stage)")
    g.add_argument("--resume", action="store_true", help="continue the killed run in --out, with the same flags")
    g.add_argument("--dry-run", action="store_true", help="one batch, one epoch a stage, outputs under runs/dry_run")
    args = p.parse_args(argv)
    if args.size < 32 or args.size % 32:
        p.error(f"--size {args.size}: the UNet needs a positive multiple of 32")
    if not (0 < args.lr < math.inf and 0 <= args.clip_grad < math.inf) or min(args.epochs, args.pretrain_epochs,
                                                                                  args.seed + 1, args.save_every + 1) < 1:
        p.error("--lr must be positive and finite, --clip-grad finite, --epochs and --pretrain-epochs >= 1, "
                "--seed and --save-every >= 0")
    if args.batch_size < 2 or not 0 <= args.threshold <= 1 or not 0 <= args.holdout < 1:
        p.error("--batch-size must be at least 2 (BatchNorm), --threshold in [0, 1], --holdout in [0, 1)")
    if args.pretrained and args.weights:
        p.error("--pretrained and --weights both set the encoder's weights: pick one")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.split(":")[0] not in ("cpu", "cuda") or (args.device != "cpu" and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: not available here (cpu, or cuda, cuda:1, ... on a machine with CUDA)")
    args.out = Path(args.out or Path("runs/dry_run" if args.dry_run else "runs") / f"masker_WBC_{args.split}")
    return args


def mask_sources(roots, data):
    """(data, mask) folders of each --pretrain-on root. A WBC_* folder of the dataset being trained is refused:
    its masks would go beyond the split's budget (WBC_1 fine-tunes on its 7 masks, not on WBC_100's)."""
    for root in map(Path, roots):
        folder = next((root / sub for sub in ("train", "WBC_100/train", "CAM16/train") if (root / sub / "mask").is_dir()),
                      None)
        if folder is None:
            raise DataError(f"--pretrain-on {root}: no train/mask, WBC_100/train/mask or CAM16/train/mask under it")
        if folder.resolve().parent.name.startswith("WBC_") and folder.resolve().parent.parent == Path(data).resolve():
            raise DataError(f"--pretrain-on {root}: these are masks of the dataset being trained ({folder}); "
                            f"the split's masks are used anyway, and more would break the split's budget")
        yield folder / "data", folder / "mask"


def train_one_epoch(forward, model, images, masks, loss_fn, optimizer, scaler, autocast, batch_size, device,
                    clip_grad, max_batches=None):
    """One pass over (images (N, 3, S, S) uint8, masks (N, 1, S, S) uint8). Returns loss, pixel error,
    img/s and the 1-based step of the first non-finite loss (0 if none): one host sync per epoch."""
    model.train()
    total_loss, wrong, bad_step = (torch.zeros((), device=device) for _ in range(3))
    batches = batch_indices(len(images), batch_size, shuffle=True, drop_last=True)[:max_batches]
    start = time.perf_counter()
    for step, idx in enumerate(batches, 1):
        x, m = make_batch(images, masks, idx, device, train=True)
        with autocast:
            logits = forward(x)                                            # (B, 1, S, S)
        loss = loss_fn(logits, m)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()          # the scaler is a no-op unless --amp fp16
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.detach() * len(idx)
        wrong += ((logits.detach() > 0) != (m > 0.5)).float().mean((1, 2, 3)).sum()
    seen = sum(len(idx) for idx in batches)
    return total_loss.item() / seen, wrong.item() / seen, seen / (time.perf_counter() - start), int(bad_step)


def fit(stage, forward, model, images, masks, epochs, args, scaler, autocast, log_rows, saved, resume=None):
    """Adam with cosine decay over `epochs`, one log line per epoch; checkpoint.pt every few epochs and at
    the stage's end (only from finite weights); `resume`, a checkpoint of this stage, continues it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=args.device != "cpu" or None,
                                 foreach=args.device == "cpu" or None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    first, ckpt_path, every = 1, args.out / "checkpoint.pt", args.save_every or max(1, epochs // 20)
    state = resume   # what a resumed stage that had already ended returns
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])   # last: the loop draws the same batches as an unbroken run
        first = resume["epoch"] + 1
    for epoch in range(first, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss, err, speed, bad_step = train_one_epoch(forward, model, images, masks, MASKER_LOSSES[args.loss], optimizer,
                                                     scaler, autocast, args.batch_size, args.device, args.clip_grad,
                                                     1 if args.dry_run else None)
        scheduler.step()
        finite = all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point())
        if bad_step or not finite:
            sys.exit(f"error: {stage} epoch {epoch}/{epochs} " + (f"step {bad_step}: the loss is {loss}" if bad_step else
                     "the weights became") + f" (not finite); stopped, {saved}. Try a lower --lr or --clip-grad")
        print(f"{stage} epoch {epoch}/{epochs} | loss {loss:.4f} | pixel error {100 * err:.2f}% | lr {lr:.2e} | "
              f"{speed:.0f} img/s", flush=True)
        log_rows.append({"stage": stage, "epoch": epoch, "loss": loss, "pixel_error": err, "lr": lr, "img_s": speed})
        state = {"kind": "masker", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "stage": stage, "epoch": epoch,
                 "finished": False, "log_rows": log_rows, "args": args.plain, "fingerprint": args.fingerprint,
                 "rng": {"torch": torch.get_rng_state()}}
        if epoch % every == 0 or epoch == epochs:
            save_checkpoint(state, ckpt_path)
            save_csv(log_rows, args.out / "log.csv")
            saved = f"the last good checkpoint is {ckpt_path} ({stage} epoch {epoch})"
    return saved, state


def write_masks(model, image_set, folder, device, autocast, threshold):
    """A 0/255 PNG at folder/<Class>/<stem>.png for every image, at the image's own size."""
    prob = torch.sigmoid(infer(model, image_set.images, None, 64, device, autocast))   # (N, 1, S, S)
    for i, path in enumerate(image_set.paths):
        w, h = image_set.sizes[i]
        full = F.interpolate(prob[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        save_mask_png(full > threshold, Path(folder) / image_set.classes[image_set.labels[i]] / f"{path.stem}.png")


def main(argv=None):
    args = parse_args(argv)
    device, ckpt_path, cache = torch.device(args.device), args.out / "checkpoint.pt", None if args.cache == "none" else args.cache
    args.amp = amp = args.amp if args.amp != "auto" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16") \
        if device.type == "cuda" else "bf16" if torch.cpu._is_avx512_bf16_supported() else "off"   # emulated bf16 is slow
    autocast = torch.autocast(device.type, torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")   # fp16 gradients underflow without it
    torch.backends.cudnn.benchmark = True   # fixed-size batches: cuDNN times its kernels once, keeps the fastest
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32-like accuracy, faster
    torch.manual_seed(args.seed)   # shuffling, augmentation and init draw from torch's CPU RNG alone
    print(f"device {device} | amp {amp} | size {args.size} | loss {args.loss} | out {args.out}")
    claim_folder(args.out)   # refuses a second live run on the same folder
    resume = load_checkpoint(ckpt_path, ("model", "args", "optimizer", "rng", "stage")) if args.resume else None
    args.plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}   # what a checkpoint keeps
    differ = [f"--{k.replace('_', '-')} ({resume['args'].get(k)!r} then, {args.plain[k]!r} now)" for k in SAME_FOR_RESUME
              if resume and resume["args"].get(k) != args.plain[k]]
    if differ or (resume and resume["finished"]):
        sys.exit(f"--resume: {ckpt_path} " + (f"was written with other {', '.join(differ)}; rerun with the same flags"
                                              if differ else "is of a finished run") + " or use another --out")
    weights = resnet34_state_dict(args.pretrained, args.weights) if not resume else None   # before any decoding

    # 1. data: the masks of WBC_<split> (and of --pretrain-on), a held-out set, every image to draw a mask for
    dirs, sources = wbc_dirs(args.data, args.split), list(mask_sources(args.pretrain_on, args.data))
    train_all = load_set(dirs["train_data"], args.size, None, [dirs["train_mask"]], cache, args.skip_bad)
    val_all = load_set(dirs["val_data"], args.size, train_all.classes, [dirs["val_mask"]], cache, args.skip_bad)
    labelled = train_all.subset(train_all.has_mask)
    held_out, held_name = (val_all.subset(val_all.has_mask), "WBC_100/val/mask") if val_all.has_mask.any() else (None, None)
    if held_out is None and args.holdout and len(labelled) > 1:
        keep = torch.ones(len(labelled), dtype=torch.bool)
        keep[torch.randperm(len(labelled), generator=torch.Generator().manual_seed(args.seed))[:max(1, round(
            args.holdout * len(labelled)))]] = False
        held_out, labelled, held_name = labelled.subset(~keep), labelled.subset(keep), f"--holdout {args.holdout}"
    if len(labelled) < 2:   # BatchNorm cannot train on a batch of one
        raise DataError(f"{dirs['train_mask']}: {len(labelled)} mask(s) matching images of {dirs['train_data']} "
                        f"(<Class>/<stem>.png beside <Class>/<stem>.<ext>); the masker needs at least 2")
    pre = [load_set(d, args.size, None, [m], cache, args.skip_bad) for d, m in sources]
    pre = [s.subset(s.has_mask) for s in pre]
    args.fingerprint = " ".join([labelled.fingerprint] + [s.fingerprint for s in pre])
    if resume and resume["fingerprint"] != args.fingerprint:
        sys.exit(f"--resume: {ckpt_path} was trained on other files (images or masks changed since); start afresh")
    n_full = sum(1 for _ in Path(args.data, "WBC_100", "train", "mask").glob("*/*")) or len(labelled)
    epochs = 1 if args.dry_run else max(1, round(args.epochs * n_full / len(labelled)))   # same epochs x images
    print(f"fine-tune on {len(labelled)} masks of WBC_{args.split} for {epochs} epochs; held out: "
          + (f"{len(held_out)} masks ({held_name})" if held_out else "none"))

    # 2. model: a UNet whose encoder is a torchvision resnet34 (ImageNet or a file, or random)
    model = UNet()
    if weights is not None:
        load_backbone(model.encoder, weights, args.weights or "ImageNet weights")
    if resume:
        model.load_state_dict(resume["model"])
    model = model.to(device, memory_format=torch.channels_last)   # NHWC: faster convolutions on GPUs and CPUs
    forward = torch.compile(model) if args.compile else model

    # 3-4. optimizer and loop of each stage: pretraining on the union of --pretrain-on's masks, then fine-tuning
    log_rows = resume["log_rows"] if resume else []
    saved = f"the last good checkpoint is {ckpt_path}" if resume else "no checkpoint had been saved yet"
    (args.out / "metrics.json").unlink(missing_ok=True)   # no old result stays beside this run's files
    if pre and not (resume and resume["stage"] == "wbc"):
        images, masks = torch.cat([s.images for s in pre]), torch.cat([s.masks for s in pre])
        print(f"pretrain on {len(images)} masks of {' + '.join(args.pretrain_on)} for {args.pretrain_epochs} epochs")
        saved, _ = fit("pretrain", forward, model, images, masks, 1 if args.dry_run else args.pretrain_epochs, args,
                       scaler, autocast, log_rows, saved, resume)
    saved, state = fit("wbc", forward, model, labelled.images, labelled.masks, epochs, args, scaler, autocast, log_rows,
                       saved, resume if resume and resume["stage"] == "wbc" else None)

    # 5. scores; masks for every image, written beside and swapped in whole
    metrics = {name: mask_metrics(mask_counts(torch.sigmoid(infer(model, s.images, None, 64, device, autocast))
                                              > args.threshold, s.masks > 0))
               for name, s in (("train", labelled), ("held_out", held_out)) if s is not None}
    metrics.update(split=args.split, loss=args.loss, pretrain_on=args.pretrain_on, n_masks=len(labelled), epochs=epochs)
    save_checkpoint(state | {"finished": True, "metrics": metrics}, ckpt_path)
    new, final = args.out / ".masks.new", args.out / "masks"
    shutil.rmtree(new, ignore_errors=True)
    write_masks(model, train_all, new / "train", device, autocast, args.threshold)
    write_masks(model, val_all, new / "val", device, autocast, args.threshold)
    shutil.rmtree(final, ignore_errors=True)   # a kill here leaves no masks, never a mix of two runs'
    os.replace(new, final)
    save_json(metrics, args.out / "metrics.json")
    for name in ("train", "held_out"):
        if name in metrics:
            m = metrics[name]
            print(f"{name}: pixel error {100 * m['pixel_error']:.2f}% | IoU {m['iou']:.3f} | Dice {m['dice']:.3f}")
    print(f"wrote {ckpt_path}, {args.out / 'metrics.json'}, {args.out / 'log.csv'} and the masks of "
          f"{len(train_all)} + {len(val_all)} images under {final}/{{train,val}}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (DataError, KeyboardInterrupt) as e:
        sys.exit(f"error: {e}" if isinstance(e, DataError) else "interrupted: --resume continues from the last checkpoint")
