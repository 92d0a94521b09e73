"""Score a classifier (the report's per-class error table with weighted mean and std, accuracy, balanced accuracy,
macro F1, the majority baseline, the confusion matrix) or a masker (pixel error, IoU, Dice of the cell class).

    python evaluate.py runs/classifier_WBC_10_alpha-1_1/checkpoint.pt             # on DATA/WBC_100/val
    python evaluate.py CKPT --data some/other/<Class>/<image>/folder --json r.json # any class folder
    python evaluate.py runs/masker_WBC_10/checkpoint.pt                            # on WBC_100/val/mask
    python evaluate.py --pred-masks runs/masker_WBC_10/masks/val --true-masks data/WBC_100/val/mask
"""
import argparse
import sys
from pathlib import Path

import torch

from data import DataError, decode_all, infer, load_checkpoint, load_set, save_json, scan_folder
from losses import (classification_metrics, confusion_matrix, mask_counts, mask_metrics,
                    mean_image_dice)
from resnet_cls import ResNetClassifier
from unet import UNet

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint.pt of train_classifier.py or train_masker.py")
    p.add_argument("--data", help="dataset root (scores WBC_100/val) or a <Class>/<image> folder (default: the run's)")
    p.add_argument("--mask-dir", help="masks <Class>/<stem>.png for --mask-mode channel (default: the run's MASKS/val)")
    p.add_argument("--pred-masks", help="folder of predicted masks <Class>/<stem>.png")
    p.add_argument("--true-masks", help="folder of ground-truth masks <Class>/<stem>.<ext>")
    p.add_argument("--size", type=int, help="working size (default: the checkpoint's; 224 for --pred-masks)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if bool(args.pred_masks) != bool(args.true_masks):
        p.error("--pred-masks and --true-masks go together")
    if not args.checkpoint and not args.pred_masks:
        p.error("give a checkpoint, or --pred-masks and --true-masks")
    if args.batch_size < 1 or (args.size is not None and args.size < 32):
        p.error("--batch-size must be >= 1 and --size >= 32")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json}: is a folder; give a file name")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.split(":")[0] not in ("cpu", "cuda") or (args.device != "cpu" and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: not available here (cpu, or cuda, cuda:1, ... on a machine with CUDA)")
    return args

def pick_amp(device):
    """The --amp auto rule: bf16 where `device` computes it natively, fp16 on older GPUs, else
    off."""
    if device.type == "cuda":   # not is_bf16_supported(): True on a T4, which emulates bf16 slowly
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        return "bf16" if native_bf16 else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "off"

def prepare(model, ckpt, args, what):
    """`model` with the checkpoint's weights on --device, the size, the scored folder (a dataset root means its
    WBC_100/val/data, else a <Class>/<image> folder), the device's autocast; or SystemExit saying
    what is wrong."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        why = [line.strip() for line in str(e).splitlines() if line.strip()]   # torch's second line names a key
        raise SystemExit(f"{args.checkpoint}: weights don't fit {what} ({why[min(1, len(why) - 1)][:300]})") from None
    run = ckpt["args"]
    for key in ("size", "data"):
        if not getattr(args, key) and key not in run:
            raise SystemExit(f"{args.checkpoint}: the checkpoint's args lack {key!r} (not written by this repo?)")
    data = Path(args.data or run["data"])
    folder = data / "WBC_100" / "val" / "data" if (data / "WBC_100" / "val" / "data").is_dir() else data
    amp = pick_amp(torch.device(args.device))   # this device's rule, whatever the run trained with
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16   # inference: fp16 needs no scaler
    autocast = torch.autocast(torch.device(args.device).type, dtype, enabled=amp != "off")
    return model.to(args.device, memory_format=torch.channels_last), args.size or run["size"], folder, autocast

def evaluate_classifier(ckpt, args):
    run, classes, channel = ckpt["args"], ckpt.get("classes"), ckpt["args"].get("mask_mode") == "channel"
    if not classes:
        raise SystemExit(f"{args.checkpoint}: a classifier checkpoint without its list of classes")
    model, size, folder, autocast = prepare(ResNetClassifier(len(classes), 4 if channel else 3), ckpt, args,
                                            f"a {len(classes)}-class, {4 if channel else 3}-channel ResNet34")
    own = Path(run["data"]) / "WBC_100" / "val" / "data" if "data" in run else None
    same = own is not None and folder.resolve() == own.resolve()   # the run's masks/val: these
    if channel and not args.mask_dir and not same:
        raise SystemExit(f"--data {args.data}: a mask-channel classifier needs masks of these "
                         "images: give --mask-dir")
    masks = Path(args.mask_dir) if args.mask_dir else Path(run.get("masks", "masks")) / "val"
    data = load_set(folder, size, classes=classes, mask_dirs=[masks] if channel else [])
    if channel and not data.has_mask.all():
        raise DataError(f"{masks}: a mask-channel classifier needs a mask for every image of {folder}")
    logits = infer(model, data.images, data.masks, args.batch_size, args.device, autocast, channel,
                   run.get("white_balance", False))   # as the model was trained
    m = classification_metrics(confusion_matrix(data.labels, logits.argmax(1), len(classes)), classes)
    print(f"{args.checkpoint} on {folder} ({len(data)} images)\n{'class':<12} {'n':>6} {'error':>8}")
    for c, e in m["per_class_error"].items():   # the report's table, then the summary and the confusion matrix
        print(f"{c:<12} {m['support'][c]:>6} {'-' if e is None else f'{100 * e:.2f}%':>8}")
    print(f"{'weighted mean':<19} {100 * m['weighted_mean_error']:>7.2f}%")
    print(f"{'std':<19} {100 * m['per_class_error_std']:>7.2f}%")
    print(f"accuracy {100 * m['accuracy']:.2f}% | balanced accuracy {100 * m['balanced_accuracy']:.2f}% | "
          f"macro F1 {m['macro_f1']:.3f} | majority baseline {100 * m['majority_baseline']:.2f}%")
    print("confusion (rows true, columns predicted; column j is the class of row j):")
    width = max(map(len, classes))
    print(" " * (width + 4) + " ".join(f"{j:>5}" for j in range(1, len(classes) + 1)))
    for j, (c, row) in enumerate(zip(classes, m["confusion"]), 1):   # whole names, however alike
        print(f"{j:>2} {c:<{width}} " + " ".join(f"{v:>5}" for v in row))
    return m | {"data": str(folder)}

def evaluate_masker(ckpt, args):
    model, size, folder, autocast = prepare(UNet(), ckpt, args, "the UNet")
    if size % 32:
        raise SystemExit(f"--size {size}: the UNet needs a multiple of 32")
    data = load_set(folder, size, mask_dirs=[folder.parent / "mask"])   # .../val/data -> .../val/mask
    data = data.subset(data.has_mask)
    if len(data) == 0:
        raise DataError(f"{folder.parent / 'mask'}: no ground-truth masks to score the masker against")
    logits = infer(model, data.images, None, args.batch_size, args.device, autocast)
    threshold = ckpt["args"].get("threshold", 0.5)
    cells = torch.sigmoid(logits) >= threshold   # the rule of the masker and predict.py
    return mask_report(cells, data.masks > 0, f"{args.checkpoint} on {len(data)} masks of {folder}",
                       data=str(folder), n=len(data))

def compare_mask_folders(pred_dir, true_dir, size):
    """Every true mask against the predicted mask of the same <Class>/<stem>, both decoded at `size`."""
    paths, labels, classes, _ = scan_folder(true_dir)
    preds = {(p.parent.name, p.stem): p for p in Path(pred_dir).glob("*/*.png")}
    missing = [str(p) for p, y in zip(paths, labels) if (classes[y], p.stem) not in preds]
    if missing:
        raise DataError(f"{pred_dir}: no predicted mask for {len(missing)} true mask(s), e.g. {missing[0]}")
    files = [preds[classes[y], p.stem] for p, y in zip(paths, labels)] + paths   # predicted, then true
    masks, _, bad = decode_all("mask", files, size)
    if bad:
        raise DataError(f"unreadable masks: {[str(files[i]) for i in bad]}")
    pred, true = torch.from_numpy(masks > 0).split(len(paths))
    return mask_report(pred, true, f"{pred_dir} against {true_dir} ({len(paths)} masks at {size} px)", n=len(paths))

def mask_report(pred, true, title, **extra):
    """Pixel error, IoU and Dice pooled over every pixel, and the mean of each image's Dice, of
    bool masks `pred` against `true` (N, ...), + `extra`; printed under `title`."""
    m = mask_metrics(mask_counts(pred, true))
    m["mean_image_dice"] = mean_image_dice(pred, true)
    m |= extra
    print(title)
    print(f"pixel error {100 * m['pixel_error']:.2f}% | IoU {m['iou']:.3f} | Dice {m['dice']:.3f} "
          f"(pooled over pixels) | mean Dice per image {m['mean_image_dice']:.3f}")
    return m

def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")   # undecodable name bytes print as \udcff
    if args.pred_masks:
        metrics = compare_mask_folders(args.pred_masks, args.true_masks, args.size or 224)
    else:
        ckpt = load_checkpoint(args.checkpoint)
        if ckpt.get("finished") is False:   # a kill or a NaN stopped it: say so, still score it
            print(f"note: {args.checkpoint} is from an unfinished run (stopped after epoch {ckpt.get('epoch')})")
        if ckpt.get("kind") not in ("classifier", "masker"):
            raise SystemExit(f"{args.checkpoint}: checkpoint kind {ckpt.get('kind')!r} is not classifier or masker")
        metrics = (evaluate_classifier if ckpt["kind"] == "classifier" else evaluate_masker)(ckpt, args)
    if args.json:
        save_json(metrics, args.json)
        print(f"wrote {args.json}")
    return metrics

if __name__ == "__main__":
    try:
        main()
    except DataError as e:   # bad input on disk: one line naming the file, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:   # Ctrl-C: one line, not a traceback; nothing was written
        sys.exit("interrupted")
