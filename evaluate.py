"""Score a classifier (the report's per-class error table with weighted mean and std, accuracy,
balanced accuracy, macro F1, the majority baseline, the confusion matrix; NLL, Brier score and ECE
before and after the temperature its --holdout fitted) or a masker (pixel error, IoU, Dice of the
cell class).

    python evaluate.py runs/classifier_WBC_10_alpha-1_1/checkpoint.pt   # on DATA/WBC_100/val
    python evaluate.py CKPT --data some/other/<Class>/<image>/folder --json r.json   # any folder
    python evaluate.py runs/masker_WBC_10/checkpoint.pt                  # on WBC_100/val/mask
    python evaluate.py CKPT --tta --reliability r.png   # 8 views each; a reliability diagram
    python evaluate.py --pred-masks runs/masker_WBC_10/masks/val --true-masks data/WBC_100/val/mask
"""
import argparse
import sys
from pathlib import Path

import torch

from data import (DataError, decode_all, guide_for, infer, load_checkpoint, load_set,
                  resize_masks, save_json, scan_folder)
from losses import (classifier_scores, mask_counts, mask_metrics, mean_image_dice,
                    reliability_bins)
from resnet_cls import ResNetClassifier
from unet import UNet

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # pick_amp -> dtype
# the classifier's summary line, filled from classification_metrics()
SUMMARY = ("accuracy {accuracy:.2%} | balanced accuracy {balanced_accuracy:.2%} | "
           "macro F1 {macro_f1:.3f} | majority baseline {majority_baseline:.2%}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?",
                   help="a checkpoint.pt of train_classifier.py or train_masker.py")
    p.add_argument("--data", help="dataset root (scores WBC_100/val) or a <Class>/<image> folder "
                   "(default: the run's)")
    p.add_argument("--mask-dir", help="masks <Class>/<stem>.png for --mask-mode channel, input, "
                   "crop (default: the run's MASKS/val)")
    p.add_argument("--masker", help="a train_masker.py checkpoint: draws those masks first "
                   "(--mask-dir wins)")
    p.add_argument("--pred-masks", help="folder of predicted masks <Class>/<stem>.png")
    p.add_argument("--true-masks", help="folder of ground-truth masks <Class>/<stem>.<ext>")
    p.add_argument("--size", type=int,
                   help="working size (default: the checkpoint's; 224 for --pred-masks)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--tta", action="store_true",
                   help="mean probability over the 8 flips and quarter turns (masks drawn too)")
    p.add_argument("--reliability", help="a classifier's reliability diagram to this PNG "
                   "(needs matplotlib)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if bool(args.pred_masks) != bool(args.true_masks):
        p.error("--pred-masks and --true-masks go together")
    if not args.checkpoint and not args.pred_masks:
        p.error("give a checkpoint, or --pred-masks and --true-masks")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.size is not None and args.size < 32:
        p.error("--size must be >= 32")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json}: is a folder; give a file name")
    if args.reliability and Path(args.reliability).is_dir():
        p.error(f"--reliability {args.reliability}: is a folder; give a file name")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: unknown (cpu, or cuda, cuda:1, ...)")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: not available here (no CUDA; use cpu)")
    return args


def pick_amp(device):
    """The --amp auto rule: bf16 where `device` computes it natively, fp16 on older GPUs, else
    off."""
    if device.type == "cuda":   # not is_bf16_supported(): True on a T4, which emulates bf16 slowly
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        return "bf16" if native_bf16 else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "off"


def load_model(ckpt, kind, path):
    """The checkpoint's UNet or ResNet34 classifier with its weights, or SystemExit naming what
    does not fit."""
    if kind == "masker":
        model = UNet()
        what = "the UNet"
    else:
        classes = ckpt.get("classes")
        if not classes:
            raise SystemExit(f"{path}: a classifier checkpoint without its list of classes")
        channels = 4 if ckpt["args"].get("mask_mode") == "channel" else 3   # RGB (+ the mask)
        model = ResNetClassifier(len(classes), channels)
        what = f"a {len(classes)}-class, {channels}-channel ResNet34"
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        why = str(e).splitlines()[1].strip()[:300]   # line 0 names the model, line 1 a key
        raise SystemExit(f"{path}: weights don't fit {what} ({why})") from None
    return model


def evaluate_classifier(model, ckpt, folder, size, autocast, args):
    """The report's numbers of the classifier `model` on `folder`'s images at `size`, printed."""
    run = ckpt["args"]
    classes = ckpt["classes"]
    mask_mode = run.get("mask_mode", "loss")
    channel = mask_mode == "channel"   # the mask is a 4th input channel
    seen_masks = mask_mode != "loss"   # channel, input, crop: the model sees the mask
    drawn = seen_masks and args.masker and not args.mask_dir   # stage 1 first, as a user runs it
    own = None   # the run's own validation images: the only ones its MASKS/val are drawn for
    if "data" in run:
        own = (Path(run["data"]) / "WBC_100" / "val" / "data").resolve()
    other = folder.resolve() != own
    if seen_masks and not args.mask_dir and not drawn and other:   # same stems would fit silently
        raise SystemExit(f"--data {args.data}: a --mask-mode {mask_mode} classifier needs masks "
                         "of these images: give --masker or --mask-dir")
    masks = Path(args.mask_dir or Path(run.get("masks", "masks")) / "val")
    read_masks = seen_masks and not drawn
    data = load_set(folder, size, classes=classes, mask_dirs=[masks] if read_masks else [])
    if drawn:
        data.masks = draw_masks(args.masker, data.paths, size, autocast, args)
        data.has_mask = torch.ones(len(data), dtype=torch.bool)
    if seen_masks and not data.has_mask.all():
        raise DataError(f"{masks}: a --mask-mode {mask_mode} classifier needs a mask for every "
                        f"image of {folder}")
    white = run.get("white_balance", False)   # as the model was trained
    guide = guide_for(mask_mode, size)
    logits = infer(model, data.images, data.masks, args.batch_size, args.device, autocast,
                   channel, white, guide, args.tta)               # (N, C)
    temperature = ckpt.get("temperature", 1.0)   # fitted on the run's --holdout (1: none)
    metrics = classifier_scores(logits, data.labels, classes, temperature)
    print(f"{args.checkpoint} on {folder} ({len(data)} images)")
    print_calibration(metrics["calibration"])
    print_classification(metrics, classes)   # the confusion matrix last: it ends the output
    if args.reliability:
        draw_reliability(logits, data.labels, temperature, args.reliability)
    return metrics | {"data": str(folder), "tta": args.tta}


def draw_masks(masker_path, paths, size, autocast, args):
    """(N, 1, size, size) 0/1 masks that the masker at `masker_path` draws on the images
    `paths`: at test time no image comes with a mask."""
    ckpt = load_checkpoint(masker_path)
    if ckpt.get("kind") != "masker":
        raise SystemExit(f"--masker {masker_path}: not a train_masker.py checkpoint")
    model = load_model(ckpt, "masker", masker_path)
    model = model.to(args.device, memory_format=torch.channels_last)
    own_size = ckpt["args"]["size"]   # the UNet's: a multiple of 32
    images, _, bad = decode_all("image", paths, own_size)
    if bad:
        raise DataError(f"unreadable images: {[str(paths[i]) for i in bad]}")
    logits = infer(model, torch.from_numpy(images), None, args.batch_size, args.device, autocast,
                   tta=args.tta)
    cells = torch.sigmoid(logits) >= ckpt["args"].get("threshold", 0.5)   # (N, 1, S, S)
    print(f"masks drawn by {masker_path} at {own_size} px" + " with --tta" * args.tta)
    return resize_masks(cells, size)


def print_classification(metrics, classes):
    """The report's per-class error table, then the summary and the confusion matrix."""
    print(f"{'class':<12} {'n':>6} {'error':>8}")
    for name, error in metrics["per_class_error"].items():
        shown = "-" if error is None else f"{error:.2%}"   # "-": no image of this class
        print(f"{name:<12} {metrics['support'][name]:>6} {shown:>8}")
    print(f"{'weighted mean':<19} {metrics['weighted_mean_error']:>8.2%}")
    print(f"{'std':<19} {metrics['per_class_error_std']:>8.2%}")
    print(SUMMARY.format_map(metrics))
    print("confusion (rows true, columns predicted; column j is the class of row j):")
    width = max(map(len, classes))   # whole names, however alike
    print(" " * (width + 4) + " ".join(f"{j:>5}" for j in range(1, len(classes) + 1)))
    for j, (name, row) in enumerate(zip(classes, metrics["confusion"]), 1):
        print(f"{j:>2} {name:<{width}} " + " ".join(f"{count:>5}" for count in row))


def print_calibration(calibrated):
    """NLL, Brier score and ECE before and after the checkpoint's temperature."""
    before = calibrated["before"]
    after = calibrated["after"]
    print(f"calibration, temperature {calibrated['temperature']:.3f} (exactly 1: the run had no "
          f"--holdout to fit it on): NLL {before['nll']:.3f} -> {after['nll']:.3f} | Brier "
          f"{before['brier']:.3f} -> {after['brier']:.3f} | ECE (15 bins) {before['ece']:.3f} -> "
          f"{after['ece']:.3f}")


def draw_reliability(logits, labels, temperature, path):
    """Accuracy against top probability in 15 bins, before and after `temperature`, to the PNG
    `path`; a note instead without matplotlib."""
    try:
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")   # files only, no display
    except ImportError:
        print("matplotlib is not installed: no reliability diagram (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(4, 4))
    for name, t in (("raw", 1.0), (f"T = {temperature:.2f}", temperature)):
        count, _, correct = reliability_bins((logits / t).softmax(1), labels)
        centres = (torch.arange(len(count)) + 0.5) / len(count)   # the bins' middles
        used = count > 0   # an empty bin has no accuracy
        ax.plot(centres[used], correct[used] / count[used], "o-", label=name)
    ax.plot([0, 1], [0, 1], "k:", label="calibrated")
    ax.set(xlabel="top probability (15 bins)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def evaluate_masker(model, ckpt, folder, size, autocast, args):
    """Mask scores of the masker `model` on `folder`'s images that have a true mask, printed."""
    if size % 32:
        raise SystemExit(f"--size {size}: the UNet needs a multiple of 32")
    truth = folder.parent / "mask"   # .../val/data -> .../val/mask
    data = load_set(folder, size, mask_dirs=[truth])
    data = data.subset(data.has_mask)
    if len(data) == 0:
        raise DataError(f"{truth}: no ground-truth masks to score the masker against")
    logits = infer(model, data.images, None, args.batch_size, args.device, autocast,
                   tta=args.tta)
    cells = torch.sigmoid(logits) >= ckpt["args"].get("threshold", 0.5)   # as the masker draws
    title = f"{args.checkpoint} on {len(data)} masks of {folder}" + " with --tta" * args.tta
    scores = mask_report(cells, data.masks > 0, title)
    return scores | {"data": str(folder), "n": len(data), "tta": args.tta}


def compare_mask_folders(pred_dir, true_dir, size):
    """Every true mask against the predicted mask of the same <Class>/<stem>, both decoded at
    `size`: mask_report's scores, printed."""
    paths = scan_folder(true_dir)[0]   # <Class>/<stem>.<ext>
    predicted = {(path.parent.name, path.stem): path for path in Path(pred_dir).glob("*/*.png")}
    missing = [str(path) for path in paths if (path.parent.name, path.stem) not in predicted]
    if missing:
        raise DataError(f"{pred_dir}: no predicted mask for {len(missing)} true mask(s), "
                        f"e.g. {missing[0]}")
    files = [predicted[path.parent.name, path.stem] for path in paths] + paths   # then the true
    masks, _, bad = decode_all("mask", files, size)
    if bad:
        raise DataError(f"unreadable masks: {[str(files[i]) for i in bad]}")
    pred, true = torch.from_numpy(masks > 0).split(len(paths))
    title = f"{pred_dir} against {true_dir} ({len(paths)} masks at {size} px)"
    return mask_report(pred, true, title) | {"n": len(paths)}


def mask_report(pred, true, title):
    """Pixel error, IoU and Dice pooled over every pixel, and the mean of each image's Dice, of
    bool masks `pred` against `true` (N, ...); printed under `title`."""
    scores = mask_metrics(mask_counts(pred, true))
    scores["mean_image_dice"] = mean_image_dice(pred, true)
    print(title)
    print(f"pixel error {scores['pixel_error']:.2%} | IoU {scores['iou']:.3f} | "
          f"Dice {scores['dice']:.3f} (pooled over pixels) | "
          f"mean Dice per image {scores['mean_image_dice']:.3f}")
    return scores


def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")   # undecodable name bytes print as \udcff
    if args.pred_masks:
        metrics = compare_mask_folders(args.pred_masks, args.true_masks, args.size or 224)
    else:
        # 1. the checkpoint and its model
        path = args.checkpoint
        ckpt = load_checkpoint(path)
        if ckpt.get("finished") is False:   # a kill or a NaN stopped it: say so, still score it
            print(f"note: {path} is from an unfinished run (stopped after epoch "
                  f"{ckpt.get('epoch')})")
        kind = ckpt.get("kind")
        if kind not in ("classifier", "masker"):
            raise SystemExit(f"{path}: checkpoint kind {kind!r} is not classifier or masker")
        model = load_model(ckpt, kind, path)
        # 2. the data and the size: the flags, else the run's
        run = ckpt["args"]
        for key in ("size", "data"):
            if not getattr(args, key) and key not in run:
                raise SystemExit(f"{path}: the checkpoint's args lack {key!r} (not written by "
                                 "this repo?)")
        size = args.size or run["size"]
        folder = Path(args.data or run["data"])
        val = folder / "WBC_100" / "val" / "data"
        if val.is_dir():   # a dataset root: score its validation images
            folder = val
        # 3. the device and its autocast
        device = torch.device(args.device)
        model = model.to(device, memory_format=torch.channels_last)
        amp = pick_amp(device)   # this device's rule, whatever the run trained with
        # no gradients to underflow in inference: fp16 needs no grad scaler here
        autocast = torch.autocast(device.type, AMP_DTYPES[amp], enabled=amp != "off")
        # 4. score
        if kind == "classifier":
            metrics = evaluate_classifier(model, ckpt, folder, size, autocast, args)
        else:
            metrics = evaluate_masker(model, ckpt, folder, size, autocast, args)
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
