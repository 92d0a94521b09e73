"""Stage 2: train the ResNet34 WBC classifier, optionally guided by the masks (SPEC section 3).

    python train_classifier.py --alpha -1 1          # loss weighted by (-1*mask + 1): the surroundings
    python train_classifier.py --alpha 1 0 --balance # only the cell, class-balanced
    python train_classifier.py                       # no mask: plain cross-entropy

Masks: the ground-truth mask of WBC_<split>/train/mask where there is one, else the generated
one from --masks (default runs/masker_WBC_<split>/masks, written by train_masker.py).
Writes to --out: checkpoint.pt (last epoch), log.csv (one row per epoch) and metrics.json
(evaluate.py's report on WBC_100/val).
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import (SPLITS, DataError, batch_indices, infer, load_checkpoint, load_set, make_batch, pick_device,
                  precision, save_checkpoint, save_csv, save_json, seed_everything, split_epochs, wbc_dirs)
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
    g.add_argument("--cache", default=None, help="decoded-image cache folder (default DATA/.cache; 'none' = off)")
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
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast precision (auto: bf16 where the device runs it fast, else off)")
    g.add_argument("--dry-run", action="store_true", help="one batch, one epoch: checks the pipeline")
    g.add_argument("--out", default=None, help="output folder (default runs/classifier_WBC_<split>_<setting>)")
    args = p.parse_args(argv)
    if args.alpha is not None:
        try:
            check_alpha(*args.alpha)
        except ValueError as e:
            p.error(f"--alpha: {e}")
    if args.lr <= 0 or args.epochs < 1 or args.batch_size < 1 or args.size < 32:
        p.error("--lr, --epochs and --batch-size must be positive and --size at least 32")
    if sum(bool(x) for x in (args.pretrained, args.weights, args.init)) > 1:
        p.error("--pretrained, --weights and --init each set the starting weights: pick one")
    args.masks = Path(args.masks or f"runs/masker_WBC_{args.split}/masks")
    args.out = Path(args.out or f"runs/classifier_WBC_{args.split}_{setting_name(args.alpha, args.mask_mode, args.balance)}")
    return args


def setting_name(alpha, mask_mode, balance):
    """A short folder-friendly name of the mask setting, e.g. 'alpha-1_1_balance'."""
    name = "channel" if mask_mode == "channel" else "nomask"
    if alpha is not None:
        name = ("channel_" if mask_mode == "channel" else "") + f"alpha{alpha[0]:g}_{alpha[1]:g}"
    return name + ("_balance" if balance else "")


def train_one_epoch(model, data, optimizer, alpha, class_w, channel, batch_size, device, amp, max_batches=None):
    """One pass over `data` (an ImageSet whose masks are complete when alpha or channel need them).
    Returns mean loss, accuracy, img/s and the count of samples whose mask weights summed to 0."""
    model.train()
    total_loss, correct, empty = (torch.zeros((), device=device) for _ in range(3))
    seen, start = 0, time.perf_counter()
    drop_last = len(data) > batch_size   # a last batch of one breaks BatchNorm
    for step, idx in enumerate(batch_indices(len(data), batch_size, shuffle=True, drop_last=drop_last)):
        if max_batches is not None and step >= max_batches:
            break
        x, m = make_batch(data.images, data.masks, idx, device, train=True, mask_channel=channel)
        y = data.labels[idx].to(device, non_blocking=True)
        with amp:
            logit_map = model.forward_map(x)                              # (B, C, h, w)
        logits = logit_map.float().mean((2, 3))                           # (B, C)
        if alpha is not None:
            loss, n_empty = mask_weighted_ce(logit_map, y, m, alpha, class_w)
            empty += n_empty
        else:
            loss = weighted_ce(logits, y, class_w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
    elapsed = time.perf_counter() - start
    return total_loss.item() / seen, correct.item() / seen, seen / elapsed, int(empty.item())


def evaluate(model, data, batch_size, device, amp, channel):
    """Plain cross-entropy and accuracy on `data`, and its predictions (N,)."""
    logits = infer(model, data.images, data.masks, batch_size, device, amp, mask_channel=channel)
    preds = logits.argmax(1)
    return F.cross_entropy(logits, data.labels).item(), (preds == data.labels).float().mean().item(), preds


def attach_masks(image_set, what, need):
    """Fail clearly when `need` and some image has no mask (ground truth or generated)."""
    missing = (~image_set.has_mask).sum().item()
    if need and missing:
        example = image_set.paths[(~image_set.has_mask).nonzero()[0, 0].item()]
        raise DataError(f"{missing} of {len(image_set)} {what} images have no mask (e.g. {example}); "
                        f"generate them with train_masker.py or pass --masks")


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    device = pick_device(args.device)
    amp, amp_name = precision(device, args.amp)
    cache = None if args.cache == "none" else Path(args.cache or Path(args.data) / ".cache")
    channel = args.mask_mode == "channel"
    need_masks = args.alpha is not None or channel
    print(f"device {device} | autocast {amp_name} | size {args.size} | alpha {args.alpha} | "
          f"mask mode {args.mask_mode} | balance {args.balance} | out {args.out}")

    # 1. data: WBC_<split>/train (+ masks: ground truth first, then generated), WBC_100/val
    dirs = wbc_dirs(args.data, args.split)
    if need_masks and not (args.masks / "train").is_dir():
        raise DataError(f"{args.masks / 'train'}: no generated masks; run "
                        f"`python train_masker.py --split {args.split} --data {args.data}` first or pass --masks")
    train = load_set(dirs["train_data"], args.size, mask_dirs=[dirs["train_mask"], args.masks / "train"] if need_masks
                     else [], cache_dir=cache, skip_bad=args.skip_bad)
    val = load_set(dirs["val_data"], args.size, classes=train.classes, mask_dirs=[args.masks / "val"] if channel else [],
                   cache_dir=cache, skip_bad=args.skip_bad)
    attach_masks(train, "training", need_masks)
    attach_masks(val, "validation", channel)
    n_full = len(list(Path(args.data, "WBC_100", "train", "data").glob("*/*"))) or len(train)
    epochs = 1 if args.dry_run else split_epochs(args.epochs, len(train), n_full)
    counts = train.class_counts()
    class_w = class_weights(counts).to(device) if args.balance else None
    print(f"train {len(train)} images {dict(zip(train.classes, counts))} | val {len(val)} | {epochs} epochs")

    # 2. model
    model = build_classifier(len(train.classes), 4 if channel else 3, args.pretrained, args.weights)
    if args.init:
        load_backbone(model.backbone, {k.removeprefix("backbone."): v for k, v in
                                       load_checkpoint(args.init)["model"].items()}, source=args.init)
    model = model.to(device, memory_format=torch.channels_last)

    # 3. optimizer and schedule: Adam, StepLR halving the lr 7 times over the run
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, round(epochs / 7)), gamma=0.5)

    # 4. loop
    args.out.mkdir(parents=True, exist_ok=True)
    log_rows, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss, acc, speed, empty = train_one_epoch(model, train, optimizer, args.alpha, class_w, channel,
                                                  args.batch_size, device, amp, 1 if args.dry_run else None)
        scheduler.step()
        val_loss, val_acc, _ = evaluate(model, val, args.batch_size * 2, device, amp, channel)
        eta = (time.perf_counter() - start) / epoch * (epochs - epoch)
        print(f"epoch {epoch}/{epochs} | train loss {loss:.4f} acc {100 * acc:.2f}% | val loss {val_loss:.4f} "
              f"acc {100 * val_acc:.2f}% | lr {lr:.2e} | {speed:.0f} img/s | ETA {eta:.0f}s"
              + (f" | {empty} empty-weight samples" if empty else ""), flush=True)
        log_rows.append({"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_loss": val_loss,
                         "val_acc": val_acc, "lr": lr, "img_s": speed, "empty_weight_samples": empty})

    # 5. report and checkpoint
    _, _, preds = evaluate(model, val, args.batch_size * 2, device, amp, channel)
    metrics = classification_metrics(confusion_matrix(val.labels, preds, len(train.classes)), train.classes)
    metrics.update(split=args.split, setting=setting_name(args.alpha, args.mask_mode, args.balance), epochs=epochs,
                   train_images=len(train), seconds=time.perf_counter() - start)
    save_checkpoint({"kind": "classifier", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epochs,
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "classes": train.classes, "metrics": metrics}, args.out / "checkpoint.pt")
    save_csv(log_rows, args.out / "log.csv")
    save_json(metrics, args.out / "metrics.json")
    print(f"val accuracy {100 * metrics['accuracy']:.2f}% | balanced {100 * metrics['balanced_accuracy']:.2f}% | "
          f"macro F1 {metrics['macro_f1']:.3f} | majority baseline {100 * metrics['majority_baseline']:.2f}%")
    print(f"wrote {args.out / 'checkpoint.pt'}, {args.out / 'log.csv'} and {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}")
