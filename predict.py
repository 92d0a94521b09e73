"""Predict on a folder of new images, any depth, labelled or not: classes, masks and overlays a person can scan.

    python predict.py FOLDER --classifier runs/classifier_WBC_100_alpha-1_1/checkpoint.pt --out predictions
    python predict.py FOLDER --masker runs/masker_WBC_100/checkpoint.pt --classifier CKPT --adapt-bn --out OUT

Writes to --out: predictions.csv (path, predicted class, one probability column per class) with a classifier;
with a masker, masks/<path>.png (0/255, the image's own size) and overlays/<path>.png (the mask's outline
on the image). A FOLDER laid out as <Class>/<image> whose classes the classifier knows is also scored
(accuracy, balanced accuracy), and with a sibling mask/ folder the masks too (Dice), as evaluate.py does.
Scores go to scores.json. A rerun into one --out replaces the last run's CSV, masks/, overlays/
and scores.json (never a masks/ that predict.py did not write: refused), and --out's masks/ and
overlays/ are never read as inputs, even with --out inside FOLDER.

--adapt-bn (AdaBN, Li et al. 2016) recomputes every BatchNorm layer's statistics on FOLDER's images before
predicting: no labels, no gradient, weights untouched. It helps when a new microscope's colours and scale
shift the features' statistics away from the training set's.
"""
import argparse
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from data import (IMAGE_EXTS, DataError, atomic_write, claim_folder, decode_all, infer, list_images,
                  load_checkpoint, make_batch, save_csv, save_json, save_mask_png)
from losses import (classification_metrics, confusion_matrix, mask_counts, mask_metrics,
                    mean_image_dice)
from resnet_cls import ResNetClassifier
from unet import UNet

OUTPUTS = ("masks", "overlays", "predictions.csv", "scores.json")   # a rerun replaces them
MARKER = ".predict"   # in --out: its OUTPUTS are predict.py's (never clear a user's own masks/)


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
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.adapt_bn and args.batch_size < 2:
        p.error("--batch-size must be at least 2 with --adapt-bn (AdaBN needs batch statistics)")
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
    if ckpt.get("finished") is False:   # a kill or a NaN stopped it: say so, still use it
        print(f"note: {path} is from an unfinished run (stopped after epoch {ckpt.get('epoch')})")
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
    else changes; a last batch of one image joins the batch before (BatchNorm needs 2). Returns
    the model in eval mode."""
    if len(images) < 2:
        raise DataError(f"--adapt-bn needs at least 2 images (BatchNorm), not {len(images)}")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None   # None: a cumulative average over the batches, not an exponential one
    model.train()
    batches = list(torch.arange(len(images)).split(batch_size))
    if len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    for idx in batches:
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


def list_inputs(folder, out):
    """FOLDER's images, less the images predict.py writes (--out's masks/ and overlays/, when
    --out is FOLDER or inside it): a rerun never predicts on the last run's masks."""
    skip = [(out / name).resolve() for name in ("masks", "overlays")]
    full = folder.resolve()
    keep = []
    for path in list_images(folder):
        where = full / path.relative_to(folder)
        if not any(where.is_relative_to(s) for s in skip):
            keep.append(path)
    return keep


def refuse_twins(paths):
    """x.jpg beside x.png: both masks would be masks/x.png, one overwriting the other (the
    trainers refuse such twins too)."""
    stems = Counter(p.with_suffix("") for p in paths)
    twins = [str(p) for p in paths if stems[p.with_suffix("")] > 1]
    if twins:
        clash = Path(twins[0]).stem + ".png"
        raise DataError(f"{' and '.join(twins[:2])}: two images with one name (their masks would "
                        f"both be {clash}); rename or remove one")


def check_out(out):
    """A rerun replaces --out's outputs: refuse when a file of those names is not predict.py's."""
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found and not (out / MARKER).exists():
        raise DataError(f"{out}: holds {', '.join(found)} not written by predict.py; "
                        "give another --out")


def replace_outputs(out, stage, rows, scores):
    """The previous run's masks, overlays, CSV and scores out, this run's in: nothing stale
    beside the new CSV."""
    (out / MARKER).touch()   # these names are predict.py's from now on: a rerun may replace them
    for name in ("predictions.csv", "scores.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("masks", "overlays"):
        shutil.rmtree(out / name, ignore_errors=True)
        if (stage / name).is_dir():
            os.replace(stage / name, out / name)
    shutil.rmtree(stage, ignore_errors=True)
    if rows:
        save_csv(rows, out / "predictions.csv")
    if scores:
        save_json(scores, out / "scores.json")


def predict_masks(model, ckpt, paths, names, folder, decode, stage, adapt_bn, batch_size, device,
                  autocast):
    """Masks and overlays of every image into `stage`. Returns (masks (N, 1, S, S) uint8, scores
    against a sibling mask/ folder or None)."""
    size = ckpt["args"]["size"]
    threshold = ckpt["args"].get("threshold", 0.5)
    images, shapes = decode(size)
    model.to(device, memory_format=torch.channels_last)
    if adapt_bn:
        adapt_batchnorm(model, images, None, batch_size, device)
    logits = infer(model, images, None, batch_size, device, autocast)   # (N, 1, S, S)
    prob = torch.sigmoid(logits)
    cells = prob >= threshold   # one rule everywhere: probability >= threshold is cell
    for i, (path, name) in enumerate(zip(paths, names)):
        w, h = shapes[i]
        full = F.interpolate(prob[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)
        cell = full[0, 0].numpy() >= threshold
        save_mask_png(cell, stage / "masks" / Path(name).with_suffix(".png"))
        with Image.open(path) as im:   # upright, as decode_image turned it: the mask's (h, w)
            drawn = overlay(np.asarray(ImageOps.exif_transpose(im).convert("RGB")), cell)
        save_png(drawn, stage / "overlays" / Path(name).with_suffix(".png"))
    truth = folder.parent / "mask"
    pairs = []
    if truth.is_dir():   # a labelled split (.../val/data beside .../val/mask): score the masks
        pairs = [(i, truth / Path(n).with_suffix(".png")) for i, n in enumerate(names)
                 if (truth / Path(n).with_suffix(".png")).exists()]
    if not pairs:
        return cells.to(torch.uint8), None
    true, _, _ = decode_all("mask", [t for _, t in pairs], size)
    pred, true = cells[[i for i, _ in pairs]], torch.from_numpy(true) > 0
    scores = mask_metrics(mask_counts(pred, true))
    scores["mean_image_dice"] = mean_image_dice(pred, true)
    scores["n"] = len(pairs)
    return cells.to(torch.uint8), scores


def predict_classes(model, ckpt, names, decode, masks, adapt_bn, batch_size, device, autocast):
    """(CSV rows: path, predicted class, a probability per class; the scores of a <Class>/<image>
    folder of known classes, or None)."""
    classes = ckpt["classes"]
    channel = ckpt["args"].get("mask_mode") == "channel"
    white = ckpt["args"].get("white_balance", False)
    images, _ = decode(ckpt["args"]["size"])
    model.to(device, memory_format=torch.channels_last)
    if adapt_bn:
        adapt_batchnorm(model, images, masks, batch_size, device, channel, white)
    logits = infer(model, images, masks, batch_size, device, autocast, channel, white)
    probs = logits.softmax(1)
    rows = []
    for name, p in zip(names, probs):
        each = {c: f"{float(v):.4f}" for c, v in zip(classes, p)}
        rows.append({"path": name, "predicted": classes[int(p.argmax())], **each})
    tops = [Path(n).parts[0] if len(Path(n).parts) > 1 else None for n in names]
    if not all(top in classes for top in tops):   # not a <Class>/<image> folder: nothing to score
        return rows, None
    labels = torch.tensor([classes.index(top) for top in tops])
    conf = confusion_matrix(labels, probs.argmax(1), len(classes))
    return rows, classification_metrics(conf, classes)


def decoder(paths):
    """decode(size): the images at `size` (N, 3, S, S) uint8 and their (w, h), decoded once for
    both models."""
    decoded = {}

    def decode(size):
        if size not in decoded:
            images, shapes, bad = decode_all("image", paths, size, log=print)
            if bad:
                raise DataError(f"{len(bad)} unreadable image(s), e.g. {paths[min(bad)]}: {bad[min(bad)]}")
            decoded[size] = torch.from_numpy(images), shapes
        return decoded[size]
    return decode


def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")   # undecodable name bytes print as \udcff
    device, start = torch.device(args.device), time.perf_counter()
    amp = pick_amp(device)   # the trainers' rule for this device, whatever the runs trained with
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16   # inference: fp16 needs no scaler
    autocast = torch.autocast(device.type, dtype, enabled=amp != "off")
    models = {kind: load_model(path, kind) for kind, path in (("masker", args.masker),
              ("classifier", args.classifier)) if path}
    folder, out = Path(args.folder), Path(args.out)
    if folder.is_file():
        raise DataError(f"{folder}: a file; give the folder of images to predict on")
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    paths = list_inputs(folder, out)
    if not paths:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTS))})")
    if "masker" in models:
        refuse_twins(paths)
    if args.adapt_bn and len(paths) < 2:
        raise DataError(f"{folder}: --adapt-bn needs at least 2 images (BatchNorm statistics); "
                        "drop --adapt-bn")
    names = [str(p.relative_to(folder)) for p in paths]
    claim_folder(out)   # one predict.py at a time in --out
    check_out(out)
    stage = out / ".predict.new"   # this run's masks and overlays, swapped in whole at the end
    shutil.rmtree(stage, ignore_errors=True)
    print(f"{len(paths)} images under {folder} | {' and '.join(models)} | adapt BN {args.adapt_bn} "
          f"| device {device}")
    scores, masks_by_size, rows = {}, {}, None
    decode = decoder(paths)
    if "masker" in models:   # 1. masks (the classifier may read them as a 4th channel)
        model, ckpt = models["masker"]
        masks, score = predict_masks(model, ckpt, paths, names, folder, decode, stage,
                                     args.adapt_bn, args.batch_size, device, autocast)
        masks_by_size[ckpt["args"]["size"]] = masks
        if score:
            scores["masker"] = score
    if "classifier" in models:   # 2. classes
        model, ckpt = models["classifier"]
        size = ckpt["args"]["size"]
        if ckpt["args"].get("mask_mode") == "channel" and size not in masks_by_size:
            raise SystemExit(f"{args.classifier}: reads masks as a 4th channel: give --masker (of the same --size)")
        rows, score = predict_classes(model, ckpt, names, decode, masks_by_size.get(size),
                                      args.adapt_bn, args.batch_size, device, autocast)
        if score:
            scores["classifier"] = score
    replace_outputs(out, stage, rows, scores)   # 3. report
    report(scores, rows, "masker" in models, out, time.perf_counter() - start)
    return scores


def report(scores, rows, masked, out, seconds):
    """The scores, one line a model, and what was written."""
    for kind, m in scores.items():
        if kind == "classifier":
            print(f"classifier: accuracy {100 * m['accuracy']:.2f}% | "
                  f"balanced {100 * m['balanced_accuracy']:.2f}%")
        else:
            print(f"masker: Dice {m['dice']:.3f} | IoU {m['iou']:.3f} (pooled over pixels) | "
                  f"mean Dice per image {m['mean_image_dice']:.3f} on {m['n']} masks")
    wrote = ["predictions.csv"] * bool(rows) + ["masks/", "overlays/"] * masked
    wrote += ["scores.json"] * bool(scores)
    print(f"wrote {', '.join(wrote)} under {out} in {seconds:.1f}s")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:   # outputs are swapped in at the end: --out keeps the last run's
        sys.exit("interrupted: --out still holds the previous run's outputs, if any")
