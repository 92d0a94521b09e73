"""Stage 2: train the ResNet34 WBC classifier, optionally guided by the masks (SPEC section 3).

    python train_classifier.py --alpha -1 1          # loss weighted by (-1*mask + 1): the surroundings
    python train_classifier.py --alpha 1 0 --balance # only the cell, class-balanced
    python train_classifier.py                       # no mask: plain cross-entropy

Masks: the ground-truth mask of WBC_<split>/train/mask where there is one, else the generated
one from --masks (default runs/masker_WBC_<split>/masks, written by train_masker.py).
Writes to --out: checkpoint.pt, log.csv (one row per epoch) and metrics.json (evaluate.py's
report on WBC_100/val). checkpoint.pt is also updated during the run (--save-every) with the
optimizer, schedule and RNG states, so `--resume` continues a killed run where it stopped with
bit-identical results; a NaN or Inf loss stops the run and leaves the last good one in place.
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (SPLITS, Compute, DataError, FirstNonFinite, add_compute_args, add_run_args, cache_folder,
                  check_run_args, infer, load_checkpoint, load_resume, load_set, make_batch, nonfinite_error,
                  optimizer_step, pick_device, plain_args, restore_rng, rng_state, run_cli, runs_folder,
                  save_checkpoint, save_csv, save_every, save_json, seed_everything, split_epochs, train_batches,
                  wbc_dirs)
from losses import check_alpha, class_weights, classification_metrics, confusion_matrix, mask_weighted_ce, weighted_ce
from resnet_cls import build_classifier, load_backbone


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="dataset root in the SPEC layout")
    g.add_argument("--split", type=int, default=10, choices=SPLITS, help="train on WBC_<split>/train")
    g.add_argument("--masks", default=None,
                   help="generated masks, <masks>/{train,val}/<Class>/<stem>.png "
                        "(default runs/masker_WBC_<split>/masks)")
    g.add_argument("--size", type=int, default=224, help="working size in px")
    g.add_argument("--cache", default=None, help="decoded-image cache folder (default ./.cache/decoded; 'none' = off)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    g = p.add_argument_group("mask guidance and loss")
    g.add_argument("--alpha", type=float, nargs=2, metavar=("A1", "A2"), default=None,
                   help="weight the loss by (A1*mask + A2): 0 1 everywhere, 1 0 the cell, -1 1 its surroundings; "
                        "omit for plain cross-entropy")
    g.add_argument("--mask-mode", default="loss", choices=("loss", "channel"),
                   help="loss: masks only weight the loss (--alpha); channel: the mask is a 4th input channel")
    g.add_argument("--balance", action="store_true", help="class weights 1/count, rescaled to mean 1")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", action="store_true", help="ImageNet init (torchvision download)")
    g.add_argument("--weights", default=None, help="local torchvision resnet34 state dict to start from")
    g.add_argument("--init", default=None, help="start from a checkpoint of ours, dropping its fc")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=14,
                   help="epochs for WBC_100; smaller splits get more so every split sees as many images")
    g.add_argument("--batch-size", type=int, default=32, help="images per step")
    g.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate; StepLR halves it 7 times")
    add_run_args(g, "classifier_WBC_<split>_<setting>", per="run")
    add_compute_args(p.add_argument_group("speed (each is listed in the run log)"))
    args = p.parse_args(argv)
    if args.alpha is not None:
        if not all(math.isfinite(a) for a in args.alpha):
            p.error(f"--alpha {args.alpha[0]} {args.alpha[1]}: must be finite numbers")
        try:
            check_alpha(*args.alpha)
        except ValueError as e:
            p.error(f"--alpha: {e}")
    if not (0 < args.lr < math.inf) or args.epochs < 1 or args.batch_size < 1 or args.size < 32:
        p.error("--lr, --epochs and --batch-size must be positive (and finite) and --size at least 32")
    check_run_args(p, args)
    if sum(bool(x) for x in (args.pretrained, args.weights, args.init)) > 1:
        p.error("--pretrained, --weights and --init each set the starting weights: pick one")
    runs = runs_folder(args.dry_run)   # a dry run reads and writes runs/dry_run/..., never a real run's files
    args.masks = Path(args.masks or runs / f"masker_WBC_{args.split}" / "masks")
    setting = setting_name(args.alpha, args.mask_mode, args.balance)
    args.out = Path(args.out or runs / f"classifier_WBC_{args.split}_{setting}")
    return args


def setting_name(alpha, mask_mode, balance):
    """A short folder-friendly name of the mask setting, e.g. 'alpha-1_1_balance'."""
    name = "channel" if mask_mode == "channel" else "nomask"
    if alpha is not None:
        name = ("channel_" if mask_mode == "channel" else "") + f"alpha{alpha[0]:g}_{alpha[1]:g}"
    return name + ("_balance" if balance else "")


def train_one_epoch(model, data, optimizer, alpha, class_w, channel, batch_size, compute, max_batches=None,
                    clip_grad=0.0):
    """One pass over `data` (an ImageSet whose masks are complete when alpha or channel need them).
    Returns mean loss, accuracy, img/s, the count of samples whose mask weights summed to 0, and
    None or (step, steps, loss) of the first step whose loss was NaN or Inf."""
    model.train()
    device = compute.device
    total_loss, correct, empty = (torch.zeros((), device=device) for _ in range(3))
    nonfinite = FirstNonFinite(device)
    seen, start = 0, time.perf_counter()
    batches = train_batches(len(data), batch_size, max_batches)
    for step, idx in enumerate(batches):
        x, m = make_batch(data.images, data.masks, idx, device, train=True, mask_channel=channel,
                          memory_format=compute.memory_format)
        y = data.labels[idx].to(device, non_blocking=True)
        with compute.autocast:
            logit_map = model.forward_map(x)                              # (B, C, h, w)
        logits = logit_map.float().mean((2, 3))                           # (B, C)
        if alpha is not None:
            loss, n_empty = mask_weighted_ce(logit_map, y, m, alpha, class_w)
            empty += n_empty
        else:
            loss = weighted_ce(logits, y, class_w)
        optimizer_step(loss, model, optimizer, clip_grad, compute.scaler)
        total_loss += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
        nonfinite.update(step, loss.detach())
    elapsed = time.perf_counter() - start
    bad = nonfinite.result(len(batches))
    return total_loss.item() / seen, correct.item() / seen, seen / elapsed, int(empty.item()), bad


def evaluate(model, data, batch_size, compute, channel):
    """Plain cross-entropy and accuracy on `data`, and its predictions (N,)."""
    logits = infer(model, data.images, data.masks, batch_size, compute.device, compute.autocast, mask_channel=channel,
                   memory_format=compute.memory_format)
    preds = logits.argmax(1)
    return F.cross_entropy(logits, data.labels).item(), (preds == data.labels).float().mean().item(), preds


def attach_masks(image_set, what, need, folders):
    """Fail clearly when `need` and some image has no mask in `folders` (ground truth or generated)."""
    missing = (~image_set.has_mask).sum().item()
    if need and missing:
        example = image_set.paths[(~image_set.has_mask).nonzero()[0, 0].item()]
        raise DataError(f"{missing} of {len(image_set)} {what} images have no mask in "
                        f"{' or '.join(str(f) for f in folders)} (e.g. {example}); "
                        f"generate them with train_masker.py or pass --masks")


def load_data(args, cache):
    """WBC_<split>/train (+ masks: ground truth first, then generated) and WBC_100/val, every file
    checked here, before any training."""
    channel = args.mask_mode == "channel"
    need_masks = args.alpha is not None or channel
    dirs = wbc_dirs(args.data, args.split)
    if need_masks and not (args.masks / "train").is_dir():
        raise DataError(f"{args.masks / 'train'}: mask folder not found, needed by "
                        f"{'--mask-mode channel' if channel else '--alpha'}; run `python train_masker.py "
                        f"--split {args.split} --data {args.data}` first or pass --masks")
    train_masks = [dirs["train_mask"], args.masks / "train"] if need_masks else []
    train = load_set(dirs["train_data"], args.size, mask_dirs=train_masks, cache_dir=cache, skip_bad=args.skip_bad)
    val_masks = [args.masks / "val"] if channel else []
    val = load_set(dirs["val_data"], args.size, classes=train.classes, mask_dirs=val_masks, cache_dir=cache,
                   skip_bad=args.skip_bad)
    attach_masks(train, "training", need_masks, train_masks)
    attach_masks(val, "validation", channel, val_masks)
    return train, val


# the flags that shape the trained weights: --resume refuses a checkpoint written with others
SAME_FOR_RESUME = ("data", "split", "masks", "size", "alpha", "mask_mode", "balance", "pretrained", "weights",
                   "init", "epochs", "batch_size", "lr", "seed", "clip_grad", "dry_run")


def run_state(model, optimizer, scheduler, scaler, epoch, epochs, log_rows, args, classes, n_train):
    """Everything --resume needs to continue after `epoch` as if the run had never stopped."""
    return {"kind": "classifier", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "epochs": epochs, "finished": False,
            "log_rows": list(log_rows), "args": plain_args(args), "classes": classes, "train_images": n_train,
            "rng": rng_state(), "scaler": scaler.state_dict()}


def continue_from(ckpt, path, model, optimizer, scheduler, scaler, classes, n_train):
    """Load a --resume checkpoint into the new model, optimizer and scheduler and put the RNGs
    back; returns the first epoch still to run and the log rows so far."""
    if ckpt.get("classes") != classes or ckpt.get("train_images") != n_train:
        raise SystemExit(f"--resume: {path} was written for {ckpt.get('train_images')} training images of "
                         f"classes {ckpt.get('classes')}; the data now has {n_train} of {classes}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):   # fp16 runs only: the grad scaler's current scale
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"])   # last: nothing after this may draw random numbers before the loop
    print(f"resuming {path} after epoch {ckpt['epoch']}")
    return ckpt["epoch"] + 1, list(ckpt["log_rows"])


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    compute = Compute(args, pick_device(args.device))
    cache = cache_folder(args.cache)
    channel = args.mask_mode == "channel"
    ckpt_path = args.out / "checkpoint.pt"
    print(f"device {compute.device} | size {args.size} | alpha {args.alpha} | mask mode {args.mask_mode} | "
          f"balance {args.balance} | out {args.out}")
    print(f"compute: {compute.describe()}")
    # checkpoint files first: a bad one fails before any image is decoded
    resume = load_resume(ckpt_path, args, SAME_FOR_RESUME) if args.resume else None
    init = load_checkpoint(args.init)["model"] if args.init and resume is None else None

    # 1. data
    train, val = load_data(args, cache)
    n_full = len(list(Path(args.data, "WBC_100", "train", "data").glob("*/*"))) or len(train)
    epochs = 1 if args.dry_run else split_epochs(args.epochs, len(train), n_full)
    counts = train.class_counts()
    class_w = class_weights(counts).to(compute.device) if args.balance else None
    print(f"train {len(train)} images {dict(zip(train.classes, counts))} | val {len(val)} | {epochs} epochs")

    # 2. model (a resumed run's weights come from its checkpoint: no ImageNet download)
    model = build_classifier(len(train.classes), 4 if channel else 3, args.pretrained and resume is None,
                             args.weights if resume is None else None)
    if init is not None:
        # ours: a classifier ("backbone.*") or a masker, whose UNet encoder is a resnet34 too ("encoder.*")
        prefix = "encoder." if any(k.startswith("encoder.") for k in init) else "backbone."
        load_backbone(model.backbone, {k[len(prefix):]: v for k, v in init.items() if k.startswith(prefix)},
                      source=args.init)
    model = compute.prepare(model, methods=("forward", "forward_map"))

    # 3. optimizer and schedule: Adam, the lr halved at every seventh of the run
    optimizer = compute.adam(model.parameters(), lr=args.lr)
    # StepLR with step = epochs/7 without rounding it to whole epochs: 7 equal segments, each at
    # half the lr of the last, whatever the epoch count (round(10/7) = 1 would halve 10 times)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 ** math.floor(7 * e / epochs))
    first, log_rows, saved = 1, [], None
    if resume is not None:
        first, log_rows = continue_from(resume, ckpt_path, model, optimizer, scheduler, compute.scaler, train.classes,
                                        len(train))
        saved = (ckpt_path, resume["epoch"])

    # 4. loop; checkpoint.pt (and log.csv) updated every `every` epochs, for --resume
    args.out.mkdir(parents=True, exist_ok=True)
    every, start = save_every(epochs, args.save_every), time.perf_counter()
    for epoch in range(first, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss, acc, speed, empty, bad = train_one_epoch(model, train, optimizer, args.alpha, class_w, channel,
                                                       args.batch_size, compute, 1 if args.dry_run else None,
                                                       clip_grad=args.clip_grad)
        if bad is not None:
            raise SystemExit(nonfinite_error(f"epoch {epoch}/{epochs}", *bad, saved))
        scheduler.step()
        val_loss, val_acc, _ = evaluate(model, val, args.batch_size * 2, compute, channel)
        eta = (time.perf_counter() - start) / (epoch - first + 1) * (epochs - epoch)
        print(f"epoch {epoch}/{epochs} | train loss {loss:.4f} acc {100 * acc:.2f}% | val loss {val_loss:.4f} "
              f"acc {100 * val_acc:.2f}% | lr {lr:.2e} | {speed:.0f} img/s | ETA {eta:.0f}s"
              + (f" | {empty} empty-weight samples" if empty else ""), flush=True)
        log_rows.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_loss": val_loss,
                         "val_acc": val_acc, "lr": lr, "img_s": speed, "empty_weight_samples": empty})
        if epoch % every == 0 and epoch < epochs:   # the last epoch's state is saved with the report below
            save_checkpoint(run_state(model, optimizer, scheduler, compute.scaler, epoch, epochs, log_rows, args,
                                      train.classes, len(train)), ckpt_path)
            save_csv(log_rows, args.out / "log.csv")
            saved = (ckpt_path, epoch)

    # 5. report and final checkpoint
    _, _, preds = evaluate(model, val, args.batch_size * 2, compute, channel)
    metrics = classification_metrics(confusion_matrix(val.labels, preds, len(train.classes)), train.classes)
    metrics.update(split=args.split, setting=setting_name(args.alpha, args.mask_mode, args.balance), epochs=epochs,
                   train_images=len(train), seconds=time.perf_counter() - start, compute=compute.settings)
    save_checkpoint(run_state(model, optimizer, scheduler, compute.scaler, epochs, epochs, log_rows, args, train.classes,
                              len(train))
                    | {"finished": True, "metrics": metrics}, ckpt_path)
    save_csv(log_rows, args.out / "log.csv")
    save_json(metrics, args.out / "metrics.json")
    print(f"val accuracy {100 * metrics['accuracy']:.2f}% | balanced {100 * metrics['balanced_accuracy']:.2f}% | "
          f"macro F1 {metrics['macro_f1']:.3f} | majority baseline {100 * metrics['majority_baseline']:.2f}%")
    print(f"wrote {ckpt_path}, {args.out / 'log.csv'} and {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
