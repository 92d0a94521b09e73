"""Stage 1: train the UNet mask generator, then draw a mask for every image (SPEC section 2).

    python train_masker.py --split 10                 # WBC_10's masks, center loss, 224 px
    python train_masker.py --split 100 --pretrain     # CAM16 masks first, then WBC_100's

Writes to --out (default runs/masker_WBC_<split>): checkpoint.pt, log.csv, metrics.json, and
masks/{train,val}/<Class>/<stem>.png (0/255, the image's own size) for every image of
WBC_<split>/train and WBC_100/val; train_classifier.py reads them from there.
checkpoint.pt is also updated during training (--save-every) with the optimizer, schedule and
RNG states, so `--resume` continues a killed run with bit-identical results; a NaN or Inf loss
stops the run and leaves the last good one in place.
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (SPLITS, Compute, DataError, FirstNonFinite, add_compute_args, add_run_args, cache_folder,
                  check_run_args, infer, load_resume, load_set, make_batch, nonfinite_error, optimizer_step,
                  pick_device, plain_args, restore_rng, rng_state, run_cli, runs_folder, save_checkpoint, save_csv,
                  save_every, save_json, save_mask_png, seed_everything, split_epochs, train_batches, wbc_dirs)
from losses import MASKER_LOSSES, mask_counts, mask_metrics
from unet import build_unet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="dataset root in the SPEC layout")
    g.add_argument("--split", type=int, default=10, choices=SPLITS, help="train on the masks of WBC_<split>")
    g.add_argument("--size", type=int, default=224, help="working size in px (a multiple of 32)")
    g.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of the training masks held out for scoring, used only when WBC_100/val/mask "
                        "does not exist")
    g.add_argument("--cache", default=None, help="decoded-image cache folder (default ./.cache/decoded; 'none' = off)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    g = p.add_argument_group("model and loss")
    g.add_argument("--loss", default="center", choices=sorted(MASKER_LOSSES), help="center-weighted or plain BCE")
    g.add_argument("--pretrain", action="store_true", help="train on CAM16's masks before WBC's")
    g.add_argument("--pretrain-epochs", type=int, default=10, help="epochs on CAM16 with --pretrain")
    g.add_argument("--pretrained", action="store_true", help="ImageNet encoder (torchvision download)")
    g.add_argument("--weights", default=None, help="local torchvision resnet34 state dict for the encoder")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=40,
                   help="epochs for WBC_100's masks; smaller splits get more so every split sees as many images")
    g.add_argument("--batch-size", type=int, default=16, help="images per step")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 0)")
    g.add_argument("--threshold", type=float, default=0.5, help="probability above which a pixel is cell")
    add_run_args(g, "masker_WBC_<split>", per="stage")
    add_compute_args(p.add_argument_group("speed (each is listed in the run log)"))
    args = p.parse_args(argv)
    if args.size % 32:
        p.error(f"--size {args.size}: the UNet needs a multiple of 32")
    if not (0 < args.lr < math.inf) or args.epochs < 1 or args.batch_size < 1 or args.pretrain_epochs < 1:
        p.error("--lr, --epochs, --pretrain-epochs and --batch-size must be positive (and finite)")
    check_run_args(p, args)
    if not 0 <= args.threshold <= 1:
        p.error("--threshold is a probability in [0, 1]")
    if not 0 <= args.holdout < 1:
        p.error("--holdout is a fraction in [0, 1)")
    if args.pretrained and args.weights:
        p.error("--pretrained and --weights both set the encoder's weights: pick one")
    args.out = Path(args.out or runs_folder(args.dry_run) / f"masker_WBC_{args.split}")
    return args


def train_one_epoch(model, images, masks, loss_fn, optimizer, batch_size, compute, max_batches=None,
                    clip_grad=0.0):
    """One pass over (images (N, 3, S, S) uint8, masks (N, 1, S, S) uint8). Returns loss, pixel
    error, img/s, and None or (step, steps, loss) of the first step whose loss was NaN or Inf."""
    model.train()
    device = compute.device
    total_loss = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device)
    nonfinite = FirstNonFinite(device)
    seen, start = 0, time.perf_counter()
    batches = train_batches(len(images), batch_size, max_batches)
    for step, idx in enumerate(batches):
        x, m = make_batch(images, masks, idx, device, train=True, memory_format=compute.memory_format)
        with compute.autocast:
            logits = model(x)
        loss = loss_fn(logits, m)
        optimizer_step(loss, model, optimizer, clip_grad, compute.scaler)
        total_loss += loss.detach() * len(idx)
        wrong += ((logits.detach() > 0) != (m > 0.5)).float().mean((1, 2, 3)).sum()
        seen += len(idx)
        nonfinite.update(step, loss.detach())
    elapsed = time.perf_counter() - start
    bad = nonfinite.result(len(batches))
    return total_loss.item() / seen, wrong.item() / seen, seen / elapsed, bad   # one host sync per epoch


INFER_BATCH = 64   # inference keeps no activations for backward: big batches keep the device busy


def predict(model, images, compute):
    """(N, 3, S, S) uint8 -> (N, 1, S, S) float cell probabilities (inference_mode, see data.infer)."""
    return torch.sigmoid(infer(model, images, batch_size=INFER_BATCH, device=compute.device, amp=compute.autocast,
                               memory_format=compute.memory_format))


def score(model, images, masks, compute, threshold):
    """pixel_error, iou, dice of predicted vs true masks at the working size."""
    prob = predict(model, images, compute)
    return mask_metrics(mask_counts(prob > threshold, masks > 0))


def write_masks(model, image_set, folder, compute, threshold):
    """A 0/255 PNG at folder/<Class>/<stem>.png for every image, at the image's own size."""
    prob = predict(model, image_set.images, compute)
    for i, path in enumerate(image_set.paths):
        w, h = image_set.sizes[i]
        full = F.interpolate(prob[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        save_mask_png(full > threshold, Path(folder) / image_set.classes[image_set.labels[i]] / f"{path.stem}.png")
    return len(image_set.paths)


# the flags that shape the trained weights: --resume refuses a checkpoint written with others
SAME_FOR_RESUME = ("data", "split", "size", "holdout", "loss", "pretrain", "pretrain_epochs", "pretrained", "weights",
                   "epochs", "batch_size", "lr", "seed", "clip_grad", "dry_run")


def run_state(model, optimizer, scheduler, scaler, stage, epoch, log_rows, args):
    """Everything --resume needs to continue after `epoch` of `stage` as if never stopped."""
    return {"kind": "masker", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "stage": stage, "epoch": epoch, "finished": False,
            "log_rows": list(log_rows), "args": plain_args(args), "rng": rng_state(),
            "scaler": scaler.state_dict()}


def fit(model, stage, images, masks, epochs, args, compute, log_rows, saved=None, resume=None, last_stage=True):
    """Adam + cosine decay over `epochs`; one log line (and CSV row) per epoch. checkpoint.pt is
    updated every few epochs and at the end of a stage that is not the last; `resume` (a
    checkpoint of this stage) continues after its epoch. Returns the last save (path, epoch) and
    the state at the end of the stage (the final checkpoint's content)."""
    optimizer = compute.adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = MASKER_LOSSES[args.loss]
    first, ckpt_path, every = 1, args.out / "checkpoint.pt", save_every(epochs, args.save_every)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):   # fp16 runs only: the grad scaler's current scale
            compute.scaler.load_state_dict(resume["scaler"])
        restore_rng(resume["rng"])   # last: nothing after this may draw random numbers before the loop
        first = resume["epoch"] + 1
    for epoch in range(first, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss, err, speed, bad = train_one_epoch(model, images, masks, loss_fn, optimizer, args.batch_size, compute,
                                                max_batches=1 if args.dry_run else None,
                                                clip_grad=args.clip_grad)
        if bad is not None:
            raise SystemExit(nonfinite_error(f"{stage} epoch {epoch}/{epochs}", *bad, saved))
        scheduler.step()
        print(f"{stage} epoch {epoch}/{epochs} | loss {loss:.4f} | pixel error {100 * err:.2f}% | "
              f"lr {lr:.2e} | {speed:.0f} img/s", flush=True)
        log_rows.append({"stage": stage, "epoch": epoch, "loss": loss, "pixel_error": err, "lr": lr, "img_s": speed})
        if (epoch % every == 0 and epoch < epochs) or (epoch == epochs and not last_stage):
            save_checkpoint(run_state(model, optimizer, scheduler, compute.scaler, stage, epoch, log_rows, args),
                            ckpt_path)
            save_csv(log_rows, args.out / "log.csv")
            saved = (ckpt_path, f"{epoch} of stage {stage}")
    return saved, run_state(model, optimizer, scheduler, compute.scaler, stage, epochs, log_rows, args)


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    compute = Compute(args, pick_device(args.device))
    cache = cache_folder(args.cache)
    print(f"device {compute.device} | size {args.size} | loss {args.loss} | out {args.out}")
    print(f"compute: {compute.describe()}")
    ckpt_path = args.out / "checkpoint.pt"
    resume = load_resume(ckpt_path, args, SAME_FOR_RESUME) if args.resume else None   # before decoding
    if resume is not None and resume.get("stage") not in ("cam16", "wbc"):
        raise SystemExit(f"--resume: {ckpt_path}: no training stage recorded (expected 'cam16' or 'wbc')")

    # 1. data: the masks of WBC_<split> (and CAM16's), a held-out set, every image to draw a mask for
    dirs = wbc_dirs(args.data, args.split)
    train_all = load_set(dirs["train_data"], args.size, mask_dirs=[dirs["train_mask"]], cache_dir=cache,
                         skip_bad=args.skip_bad)
    val_all = load_set(dirs["val_data"], args.size, classes=train_all.classes, mask_dirs=[dirs["val_mask"]],
                       cache_dir=cache, skip_bad=args.skip_bad)
    labelled = train_all.subset(train_all.has_mask)
    if len(labelled) == 0:
        raise DataError(f"{dirs['train_mask']}: no masks matching images of {dirs['train_data']} "
                        f"(expected <Class>/<stem>.png beside the images' <Class>/<stem>.<ext>)")
    if val_all.has_mask.any():
        held_out, held_name = val_all.subset(val_all.has_mask), "WBC_100/val/mask"
    elif args.holdout > 0:
        order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(args.seed))
        n_out = max(1, round(args.holdout * len(labelled)))
        keep = torch.zeros(len(labelled), dtype=torch.bool)
        keep[order[n_out:]] = True
        held_out, labelled, held_name = labelled.subset(~keep), labelled.subset(keep), f"--holdout {args.holdout}"
    else:
        held_out, held_name = None, None
    n_full = len(list(Path(args.data, "WBC_100", "train", "mask").glob("*/*"))) or len(labelled)
    epochs = 1 if args.dry_run else split_epochs(args.epochs, len(labelled), n_full)
    print(f"fine-tune on {len(labelled)} masks of WBC_{args.split} for {epochs} epochs"
          + (f"; held out: {len(held_out)} masks ({held_name})" if held_out is not None else "; no held-out masks"))

    # 2. model (a resumed run's weights come from its checkpoint: no ImageNet download)
    model = build_unet(args.pretrained and resume is None, args.weights if resume is None else None)
    model = compute.prepare(model)
    log_rows, saved = [], None
    if resume is not None:
        model.load_state_dict(resume["model"])
        log_rows, saved = list(resume["log_rows"]), (ckpt_path, f"{resume['epoch']} of stage {resume['stage']}")
        print(f"resuming {ckpt_path} after epoch {saved[1]}")

    # 3-4. loss, optimizer and loop: CAM16 pretraining, then WBC fine-tuning
    if args.pretrain and (resume is None or resume["stage"] == "cam16"):
        cam = load_set(Path(args.data, "CAM16", "train", "data"), args.size,
                       mask_dirs=[Path(args.data, "CAM16", "train", "mask")], cache_dir=cache, skip_bad=args.skip_bad)
        cam = cam.subset(cam.has_mask)
        if len(cam) == 0:
            raise DataError(f"{Path(args.data, 'CAM16', 'train', 'mask')}: --pretrain found no CAM16 masks")
        print(f"pretrain on {len(cam)} CAM16 masks for {args.pretrain_epochs} epochs")
        saved, _ = fit(model, "cam16", cam.images, cam.masks, 1 if args.dry_run else args.pretrain_epochs, args,
                       compute, log_rows, saved, resume, last_stage=False)
    wbc_resume = resume if resume is not None and resume["stage"] == "wbc" else None
    _, state = fit(model, "wbc", labelled.images, labelled.masks, epochs, args, compute, log_rows, saved, wbc_resume)

    # 5. scores, checkpoint, masks for every image
    metrics = {"train": score(model, labelled.images, labelled.masks, compute, args.threshold)}
    if held_out is not None:
        metrics["held_out"] = score(model, held_out.images, held_out.masks, compute, args.threshold)
    metrics.update(split=args.split, loss=args.loss, pretrain=args.pretrain, n_masks=len(labelled), epochs=epochs,
                   compute=compute.settings)
    args.out.mkdir(parents=True, exist_ok=True)
    # saved before the masks are drawn: a run killed while writing them resumes straight to writing them
    save_checkpoint(state | {"finished": True, "metrics": metrics}, ckpt_path)
    save_csv(log_rows, args.out / "log.csv")
    n_train = write_masks(model, train_all, args.out / "masks" / "train", compute, args.threshold)
    n_val = write_masks(model, val_all, args.out / "masks" / "val", compute, args.threshold)
    save_json(metrics, args.out / "metrics.json")
    for name, m in metrics.items():
        if name in ("train", "held_out"):
            print(f"{name}: pixel error {100 * m['pixel_error']:.2f}% | IoU {m['iou']:.3f} | Dice {m['dice']:.3f}")
    print(f"wrote {args.out / 'checkpoint.pt'}, {args.out / 'metrics.json'}, {args.out / 'log.csv'} and "
          f"{n_train} + {n_val} masks under {args.out / 'masks'}/{{train,val}}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
