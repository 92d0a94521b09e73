"""Score a classifier or a masker.

    python evaluate.py runs/classifier_WBC_10_alpha-1_1/checkpoint.pt             # on DATA/WBC_100/val
    python evaluate.py CKPT --data some/other/<Class>/<image>/folder --json r.json # any class folder
    python evaluate.py runs/masker_WBC_10/checkpoint.pt                            # on WBC_100/val/mask
    python evaluate.py --pred-masks runs/masker_WBC_10/masks/val --true-masks data/WBC_100/val/mask

Classifier: the report's per-class error table (error per class, weighted mean, std), accuracy,
balanced accuracy, macro F1, the majority baseline and the confusion matrix.
Masker: pixel error, IoU and Dice of the cell class. --json writes the same numbers.
"""
import argparse
import sys
from pathlib import Path

import torch

from data import DataError, decode_all, infer, load_checkpoint, load_set, save_json, scan_folder
from losses import classification_metrics, confusion_matrix, mask_counts, mask_metrics
from resnet_cls import ResNetClassifier
from unet import UNet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint.pt of train_classifier.py or train_masker.py")
    p.add_argument("--data", default=None,
                   help="dataset root (scores WBC_100/val) or a <Class>/<image> folder (default: the run's --data)")
    p.add_argument("--mask-dir", help="masks <Class>/<stem>.png of the scored images, for a --mask-mode channel "
                                      "classifier (default: the run's --masks/val)")
    p.add_argument("--pred-masks", default=None, help="folder of predicted masks <Class>/<stem>.png")
    p.add_argument("--true-masks", default=None, help="folder of ground-truth masks <Class>/<stem>.<ext>")
    p.add_argument("--size", type=int, help="working size (default: the checkpoint's; 224 for --pred-masks)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
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


def class_folder(data):
    """A dataset root means its WBC_100/val/data; anything else is a <Class>/<image> folder."""
    data = Path(data)
    return data / "WBC_100" / "val" / "data" if (data / "WBC_100" / "val" / "data").is_dir() else data


def mask_folder(data_folder):
    """The ground-truth mask folder beside a data folder (.../val/data -> .../val/mask)."""
    return Path(data_folder).parent / "mask"


def load_weights(model, ckpt, path, what):
    """ckpt["model"] into `model`, or SystemExit naming the file and the first mismatch."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise SystemExit(f"{path}: weights don't fit {what} ({lines[min(1, len(lines) - 1)][:300]})") from None


def run_setting(ckpt, key, path):
    """A setting of the run that wrote the checkpoint, or SystemExit naming what is missing."""
    if key not in ckpt["args"]:
        raise SystemExit(f"{path}: the checkpoint's args lack {key!r} (not written by this repo's scripts?)")
    return ckpt["args"][key]


def evaluate_classifier(ckpt, args, device):
    run = ckpt["args"]
    classes = ckpt.get("classes")
    if not classes:
        raise SystemExit(f"{args.checkpoint}: a classifier checkpoint without its list of classes")
    channel = run.get("mask_mode") == "channel"
    model = ResNetClassifier(len(classes), 4 if channel else 3)
    load_weights(model, ckpt, args.checkpoint, f"a {len(classes)}-class, {4 if channel else 3}-channel ResNet34")
    size = args.size or run_setting(ckpt, "size", args.checkpoint)
    folder = class_folder(args.data or run_setting(ckpt, "data", args.checkpoint))
    masks = Path(args.mask_dir) if args.mask_dir else Path(run.get("masks", "masks")) / "val"
    data = load_set(folder, size, classes=classes, mask_dirs=[masks] if channel else [])
    if channel and not data.has_mask.all():
        raise DataError(f"{masks}: a mask-channel classifier needs a mask for every image of {folder}")
    logits = infer(model.to(device, memory_format=torch.channels_last), data.images, data.masks,
                   args.batch_size, device, autocast(device, run), mask_channel=channel)
    metrics = classification_metrics(confusion_matrix(data.labels, logits.argmax(1), len(classes)), classes)
    metrics["data"] = str(folder)
    print_classifier_report(metrics, classes, f"{args.checkpoint} on {folder} ({len(data)} images)")
    return metrics


def print_classifier_report(m, classes, title):
    """The report's per-class error table, then the summary metrics and the confusion matrix."""
    print(title)
    print(f"{'class':<12} {'n':>6} {'error':>8}")
    for c in classes:
        e = m["per_class_error"][c]
        print(f"{c:<12} {m['support'][c]:>6} {'-' if e is None else f'{100 * e:.2f}%':>8}")
    print(f"{'weighted mean':<19} {100 * m['weighted_mean_error']:>7.2f}%")
    print(f"{'std':<19} {100 * m['per_class_error_std']:>7.2f}%")
    print(f"accuracy {100 * m['accuracy']:.2f}% | balanced accuracy {100 * m['balanced_accuracy']:.2f}% | "
          f"macro F1 {m['macro_f1']:.3f} | majority baseline {100 * m['majority_baseline']:.2f}%")
    print("confusion (rows true, columns predicted):")
    width = max(len(c) for c in classes)
    print(" " * (width + 1) + " ".join(f"{c[:5]:>5}" for c in classes))
    for c, row in zip(classes, m["confusion"]):
        print(f"{c:>{width}} " + " ".join(f"{v:>5}" for v in row))


def evaluate_masker(ckpt, args, device):
    run = ckpt["args"]
    model = UNet()
    load_weights(model, ckpt, args.checkpoint, "the UNet")
    size = args.size or run_setting(ckpt, "size", args.checkpoint)
    if size % 32:
        raise SystemExit(f"--size {size}: the UNet needs a multiple of 32")
    folder = class_folder(args.data or run_setting(ckpt, "data", args.checkpoint))
    data = load_set(folder, size, mask_dirs=[mask_folder(folder)])
    data = data.subset(data.has_mask)
    if len(data) == 0:
        raise DataError(f"{mask_folder(folder)}: no ground-truth masks to score the masker against")
    logits = infer(model.to(device, memory_format=torch.channels_last), data.images, None, args.batch_size, device,
                   autocast(device, run))
    threshold = torch.logit(torch.tensor(run.get("threshold", 0.5))).item()
    metrics = mask_metrics(mask_counts(logits > threshold, data.masks > 0))
    metrics.update(data=str(folder), n=len(data))
    print_masker_report(metrics, f"{args.checkpoint} on {len(data)} masks of {folder}")
    return metrics


def compare_mask_folders(pred_dir, true_dir, size):
    """Pixel error, IoU, Dice of every true mask against the predicted mask of the same <Class>/<stem>."""
    true = scan_folder(true_dir)
    preds = {(p.parent.name, p.stem): p for p in Path(pred_dir).glob("*/*.png")}
    pairs = [(preds.get((true.classes[y], p.stem)), p) for p, y in zip(true.paths, true.labels)]
    missing = [str(t) for p, t in pairs if p is None]
    if missing:
        raise DataError(f"{pred_dir}: no predicted mask for {len(missing)} true mask(s), e.g. {missing[0]}")
    pred_arr, _, bad_p = decode_all("mask", [p for p, _ in pairs], size)
    true_arr, _, bad_t = decode_all("mask", [t for _, t in pairs], size)
    if bad_p or bad_t:
        raise DataError(f"unreadable masks: {[str(pairs[i][0]) for i in bad_p] + [str(pairs[i][1]) for i in bad_t]}")
    metrics = mask_metrics(mask_counts(torch.from_numpy(pred_arr) > 0, torch.from_numpy(true_arr) > 0))
    metrics["n"] = len(pairs)
    print_masker_report(metrics, f"{pred_dir} against {true_dir} ({len(pairs)} masks at {size} px)")
    return metrics


def print_masker_report(m, title):
    print(title)
    print(f"pixel error {100 * m['pixel_error']:.2f}% | IoU {m['iou']:.3f} | Dice {m['dice']:.3f}")


def autocast(device, run):
    """The precision the run trained in (its --amp, resolved), so evaluate.py scores what training scored."""
    amp = run.get("amp")
    return torch.autocast(device.type, torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp in ("bf16", "fp16"))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.pred_masks:
        metrics = compare_mask_folders(args.pred_masks, args.true_masks, args.size or 224)
    else:
        ckpt = load_checkpoint(args.checkpoint)
        kind = ckpt.get("kind")
        if ckpt.get("finished") is False:   # a kill or a NaN stopped it: say so, still score it
            print(f"note: {args.checkpoint} is from an unfinished run (stopped after epoch {ckpt.get('epoch')})")
        if kind == "classifier":
            metrics = evaluate_classifier(ckpt, args, device)
        elif kind == "masker":
            metrics = evaluate_masker(ckpt, args, device)
        else:
            raise SystemExit(f"{args.checkpoint}: unknown checkpoint kind {kind!r} (expected classifier or masker)")
    if args.json:
        save_json(metrics, args.json)
        print(f"wrote {args.json}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
