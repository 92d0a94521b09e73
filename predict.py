"""Predict on a folder of new images, any depth, labelled or not: classes, masks and overlays a person can scan.

    python predict.py FOLDER --classifier runs/classifier_WBC_100_alpha-1_1/checkpoint.pt --out predictions
    python predict.py FOLDER --masker runs/masker_WBC_100/checkpoint.pt --classifier CKPT --adapt-bn --out OUT

Writes to --out: predictions.csv (path, predicted class, one probability column per class) with a classifier;
with a masker, masks/<path>.png (0/255, the image's own size) and overlays/<path>.png (the mask's outline
on the image). A FOLDER laid out as <Class>/<image> whose classes the classifier knows is also scored
(accuracy, balanced accuracy), and with a sibling mask/ folder the masks too (Dice), as evaluate.py does.

--adapt-bn (AdaBN, Li et al. 2016) recomputes every BatchNorm layer's statistics on FOLDER's images before
predicting: no labels, no gradient, weights untouched. It helps when a new microscope's colours and scale
shift the features' statistics away from the training set's.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import (DataError, atomic_write, decode_all, infer, list_images, load_checkpoint, make_batch, save_csv,
                  save_json, save_mask_png)
from losses import classification_metrics, confusion_matrix, mask_counts, mask_metrics
from resnet_cls import ResNetClassifier
from unet import UNet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="images to predict on, any depth (hidden files and non-images are skipped)")
    p.add_argument("--classifier", help="a checkpoint.pt of train_classifier.py")
    p.add_argument("--masker", help="a checkpoint.pt of train_masker.py")
    p.add_argument("--out", required=True, help="output folder (predictions.csv, masks/, overlays/, scores.json)")
    p.add_argument("--adapt-bn", action="store_true", help="recompute BatchNorm statistics on FOLDER first (AdaBN)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (and per AdaBN batch)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    if not (args.classifier or args.masker):
        p.error("give --classifier, --masker or both")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (AdaBN needs batch statistics)")
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


def load_model(path, kind):
    """(model in eval mode, its checkpoint) of a finished run of train_<kind>.py."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != kind:
        raise SystemExit(f"{path}: a {ckpt.get('kind')} checkpoint, not a {kind}'s")
    channels = 4 if ckpt["args"].get("mask_mode") == "channel" else 3
    model = ResNetClassifier(len(ckpt["classes"]), channels) if kind == "classifier" else UNet()
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SystemExit(f"{path}: weights don't fit a {kind} ({str(e).splitlines()[0][:200]})") from None
    return model.eval(), ckpt


@torch.no_grad()
def adapt_batchnorm(model, images, masks, batch_size, device, mask_channel=False, white=False):
    """AdaBN: every BatchNorm layer's running mean and variance become the statistics of `images` (N, 3, S, S)
    uint8, averaged over batches of `batch_size` (cumulative average, so the order does not matter); nothing
    else changes. Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None   # None: a cumulative average over the batches, not an exponential one
    model.train()
    for idx in torch.arange(len(images)).split(batch_size):
        x, _ = make_batch(images, masks, idx, device, train=False, mask_channel=mask_channel, white=white)
        model(x)
    return model.eval()


def overlay(image, mask):
    """(H, W, 3) uint8 image with the outline of the (H, W) bool mask drawn in green."""
    grown = F.max_pool2d(torch.from_numpy(mask)[None, None].float(), 3, 1, 1)[0, 0].bool().numpy()
    out = image.copy()
    out[grown & ~mask] = (0, 255, 0)
    return out


def save_png(array, path):
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def main(argv=None):
    args = parse_args(argv)
    device, start = torch.device(args.device), time.perf_counter()
    amp = pick_amp(device)   # the trainers' rule for this device, whatever the runs trained with
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16   # inference: fp16 needs no scaler
    autocast = torch.autocast(device.type, dtype, enabled=amp != "off")
    models = {kind: load_model(path, kind) for kind, path in (("masker", args.masker), ("classifier", args.classifier))
              if path}
    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    paths = list_images(folder)
    if not paths:
        raise DataError(f"{folder}: no images ({', '.join(sorted(('.jpg', '.png', '.bmp', '.tif')))}...)")
    names = [str(p.relative_to(folder)) for p in paths]
    print(f"{len(paths)} images under {folder} | {' and '.join(models)} | adapt BN {args.adapt_bn} | device {device}")
    scores, masks_by_size, rows, decoded = {}, {}, None, {}

    def decode(size):
        """FOLDER's images at `size` (N, 3, S, S) uint8 and their (w, h), decoded once for both models."""
        if size not in decoded:
            images, shapes, bad = decode_all("image", paths, size, log=print)
            if bad:
                raise DataError(f"{len(bad)} unreadable image(s), e.g. {paths[min(bad)]}: {bad[min(bad)]}")
            decoded[size] = torch.from_numpy(images), shapes
        return decoded[size]

    if "masker" in models:   # 1. masks (the classifier may read them as a 4th channel)
        model, ckpt = models["masker"]
        size = ckpt["args"]["size"]
        images, shapes = decode(size)
        model.to(device, memory_format=torch.channels_last)
        if args.adapt_bn:
            adapt_batchnorm(model, images, None, args.batch_size, device)
        logits = infer(model, images, None, args.batch_size, device, autocast)   # (N, 1, S, S)
        prob = torch.sigmoid(logits)
        cells = prob > ckpt["args"].get("threshold", 0.5)
        masks_by_size[size] = cells.to(torch.uint8)
        for i, (path, name) in enumerate(zip(paths, names)):
            w, h = shapes[i]
            full = F.interpolate(prob[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
            cell = full > ckpt["args"].get("threshold", 0.5)
            save_mask_png(cell, out / "masks" / Path(name).with_suffix(".png"))
            with Image.open(path) as im:
                drawn = overlay(np.asarray(im.convert("RGB")), cell)
            save_png(drawn, out / "overlays" / Path(name).with_suffix(".png"))
        truth = folder.parent / "mask"
        if truth.is_dir():   # a labelled split (.../val/data beside .../val/mask): score the masks
            pairs = [(i, truth / Path(n).with_suffix(".png")) for i, n in enumerate(names)
                     if (truth / Path(n).with_suffix(".png")).exists()]
            if pairs:
                true, _, _ = decode_all("mask", [t for _, t in pairs], size)
                scores["masker"] = mask_metrics(mask_counts(cells[[i for i, _ in pairs]], torch.from_numpy(true) > 0))
                scores["masker"]["n"] = len(pairs)

    if "classifier" in models:   # 2. classes
        model, ckpt = models["classifier"]
        size, classes = ckpt["args"]["size"], ckpt["classes"]
        channel, white = ckpt["args"].get("mask_mode") == "channel", ckpt["args"].get("white_balance", False)
        if channel and size not in masks_by_size:
            raise SystemExit(f"{args.classifier}: reads masks as a 4th channel: give --masker (of the same --size)")
        (images, _), masks = decode(size), masks_by_size.get(size)
        model.to(device, memory_format=torch.channels_last)
        if args.adapt_bn:
            adapt_batchnorm(model, images, masks, args.batch_size, device, channel, white)
        logits = infer(model, images, masks, args.batch_size, device, autocast, channel, white)
        probs = logits.softmax(1)
        rows = [{"path": n, "predicted": classes[int(p.argmax())], **{c: f"{float(v):.4f}" for c, v in zip(classes, p)}}
                for n, p in zip(names, probs)]
        save_csv(rows, out / "predictions.csv")
        labels = [classes.index(Path(n).parts[0]) if len(Path(n).parts) > 1 and Path(n).parts[0] in classes else -1
                  for n in names]
        if labels and min(labels) >= 0:   # a <Class>/<image> folder: score it like evaluate.py
            conf = confusion_matrix(torch.tensor(labels), probs.argmax(1), len(classes))
            scores["classifier"] = classification_metrics(conf, classes)

    # 3. report
    for kind, m in scores.items():
        print(f"{kind}: " + (f"accuracy {100 * m['accuracy']:.2f}% | balanced {100 * m['balanced_accuracy']:.2f}%"
                             if kind == "classifier" else f"Dice {m['dice']:.3f} | IoU {m['iou']:.3f} on {m['n']} "
                                                           "masks"))
    if scores:
        save_json(scores, out / "scores.json")
    wrote = ["predictions.csv"] * bool(rows) + ["masks/", "overlays/"] * ("masker" in models)
    wrote += ["scores.json"] * bool(scores)
    print(f"wrote {', '.join(wrote)} under {out} in {time.perf_counter() - start:.1f}s")
    return scores


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
