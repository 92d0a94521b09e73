"""Predict on a folder of new images, any depth, labelled or not: classes, masks and overlays a
person can scan.

    python predict.py FOLDER --classifier runs/classifier_WBC_100_alpha-1_1/checkpoint.pt --out OUT
    python predict.py FOLDER --masker runs/masker_WBC_100/checkpoint.pt --classifier CKPT --out OUT
    python predict.py FOLDER --classifier CKPT --adapt-bn --out OUT   # a new microscope's images
    python predict.py FOLDER --classifier CKPT --tta --review-below 0.8 --out OUT   # 8 views each

Writes to --out: predictions.csv (path, predicted class, one probability column per class,
calibrated by the temperature the classifier's --holdout fitted; review: "yes" where the top
probability is below --review-below, for a person to check) with a classifier; with a masker,
masks/<path>.png (0/255, the image's own size) and overlays/<path>.png (the mask's outline on the
image). A FOLDER laid out as <Class>/<image> whose classes the
classifier knows is also scored (accuracy, balanced accuracy), and with a sibling mask/ folder the
masks too (Dice), as evaluate.py does. Scores go to scores.json. A rerun into one --out replaces
the last run's CSV, masks/, overlays/ and scores.json (never a masks/ that predict.py did not
write: refused), and --out's masks/ and overlays/ are never read as inputs, even with --out
inside FOLDER.

--adapt-bn (AdaBN, Li et al. 2016) recomputes every BatchNorm layer's statistics on FOLDER's
images before predicting: no labels, no gradient, weights untouched. It helps when a new
microscope's colours and scale shift the features' statistics away from the training set's.
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

from data import (IMAGE_EXTS, DataError, atomic_write, claim_folder, decode_all, guide_for, infer,
                  list_images, load_checkpoint, make_batch, resize_masks, save_csv, save_json,
                  save_mask_png)
from losses import (classification_metrics, confusion_matrix, mask_counts, mask_metrics,
                    mean_image_dice)
from resnet_cls import ResNetClassifier
from unet import UNet

OUTPUTS = ("masks", "overlays", "predictions.csv", "scores.json")   # a rerun replaces them
MARKER = ".predict"   # in --out: its OUTPUTS are predict.py's (never clear a user's own masks/)


AMP_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder",
                   help="images to predict on, any depth (hidden files and non-images are skipped)")
    p.add_argument("--classifier",
                   help="a checkpoint.pt of train_classifier.py")
    p.add_argument("--masker",
                   help="a checkpoint.pt of train_masker.py")
    p.add_argument("--out", required=True,
                   help="output folder (predictions.csv, masks/, overlays/, scores.json)")
    p.add_argument("--adapt-bn", action="store_true",
                   help="recompute BatchNorm statistics on FOLDER first (AdaBN)")
    p.add_argument("--tta", action="store_true",
                   help="mean probability over the 8 flips and quarter turns (both models)")
    p.add_argument("--review-below", type=float, default=0.0, metavar="P",
                   help="flag images whose top class probability is below P (0 = none)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward pass (and per AdaBN batch)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    if not args.classifier and not args.masker:
        p.error("give --classifier, --masker or both")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if not 0 <= args.review_below <= 1:
        p.error("--review-below must be a probability in [0, 1]")
    if args.adapt_bn and args.batch_size < 2:
        p.error("--batch-size must be at least 2 with --adapt-bn (AdaBN needs batch statistics)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: not a device (cpu, or cuda, cuda:1, ...)")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: not available here (no CUDA on this machine: cpu)")
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
    if kind == "classifier":
        model = ResNetClassifier(len(ckpt["classes"]), channels)
    else:
        model = UNet()
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0][:200]
        raise SystemExit(f"{path}: weights don't fit a {kind} ({first})") from None
    return model.eval(), ckpt


def load_models(masker, classifier):
    """{kind: (model, checkpoint)} of the checkpoints given, the masker first: its masks may
    feed the classifier."""
    models = {}
    if masker:
        models["masker"] = load_model(masker, "masker")
    if classifier:
        models["classifier"] = load_model(classifier, "classifier")
    return models


@torch.no_grad()
def adapt_batchnorm(model, images, masks, batch_size, device, mask_channel=False, white=False,
                    guide=None):
    """AdaBN: every BatchNorm layer's running mean and variance become the statistics of
    `images` (N, 3, S, S) uint8, averaged over batches of `batch_size` (cumulative average, so
    the order does not matter); nothing else changes; a last batch of one image joins the batch
    before (BatchNorm needs 2). Returns the model in eval mode."""
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
        x, _ = make_batch(images, masks, idx, device, train=False, mask_channel=mask_channel,
                          white=white, guide=guide)
        model(x)
    return model.eval()


def overlay(image, mask):
    """(H, W, 3) uint8 image with the outline of the (H, W) bool mask drawn in green."""
    cell = torch.from_numpy(mask)[None, None].float()   # (1, 1, H, W)
    grown = F.max_pool2d(cell, 3, 1, 1)[0, 0].bool().numpy()   # the mask grown by one pixel
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


def find_inputs(folder, out, masker, adapt_bn):
    """The images under FOLDER to predict on; a DataError saying why, when they won't do."""
    if folder.is_file():
        raise DataError(f"{folder}: a file; give the folder of images to predict on")
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    paths = list_inputs(folder, out)
    if not paths:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTS))})")
    if masker:
        refuse_twins(paths)
    if adapt_bn and len(paths) < 2:
        raise DataError(f"{folder}: --adapt-bn needs at least 2 images (BatchNorm statistics); "
                        "drop --adapt-bn")
    return paths


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


def save_mask_and_overlay(prob, threshold, shape, path, name, stage):
    """One image's mask at its own size (w, h) = shape, from prob (1, 1, S, S), and its overlay,
    into `stage`."""
    w, h = shape
    full = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
    cell = full[0, 0].numpy() >= threshold
    png = Path(name).with_suffix(".png")
    save_mask_png(cell, stage / "masks" / png)
    with Image.open(path) as im:   # upright, as decode_image turned it: the mask's (h, w)
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    save_png(overlay(upright, cell), stage / "overlays" / png)


def score_masks(cells, names, folder, size):
    """Dice and IoU of cells (N, 1, S, S) bool against the sibling mask/ folder's masks of a
    labelled split (.../val/data beside .../val/mask), or None without one."""
    truth = folder.parent / "mask"
    if not truth.is_dir():
        return None
    found = []   # indices of the images with a true mask
    mask_paths = []
    for i, name in enumerate(names):
        mask_path = truth / Path(name).with_suffix(".png")
        if mask_path.exists():
            found.append(i)
            mask_paths.append(mask_path)
    if not found:
        return None
    true, _, _ = decode_all("mask", mask_paths, size)
    true = torch.from_numpy(true) > 0
    pred = cells[found]
    scores = mask_metrics(mask_counts(pred, true))
    scores["mean_image_dice"] = mean_image_dice(pred, true)
    scores["n"] = len(found)
    return scores


def predict_masks(model, ckpt, paths, names, folder, decode, stage, adapt_bn, batch_size, device,
                  autocast, tta=False):
    """Masks and overlays of every image into `stage`. Returns (masks (N, 1, S, S) uint8, scores
    against a sibling mask/ folder or None)."""
    size = ckpt["args"]["size"]
    threshold = ckpt["args"].get("threshold", 0.5)
    images, shapes = decode(size)
    model.to(device, memory_format=torch.channels_last)
    if adapt_bn:
        adapt_batchnorm(model, images, None, batch_size, device)
    logits = infer(model, images, None, batch_size, device, autocast, tta=tta)   # (N, 1, S, S)
    prob = torch.sigmoid(logits)
    cells = prob >= threshold   # one rule everywhere: probability >= threshold is cell
    for i, (path, name) in enumerate(zip(paths, names)):
        save_mask_and_overlay(prob[i:i + 1], threshold, shapes[i], path, name, stage)
    scores = score_masks(cells, names, folder, size)
    return cells.to(torch.uint8), scores


def top_folder(name):
    """The first folder of a relative path: the class of a <Class>/<image> folder; None for a
    file at the top."""
    parts = Path(name).parts
    if len(parts) > 1:
        return parts[0]
    return None


def csv_rows(names, probs, classes, review_below=0.0):
    """A row per image: path, predicted class, a probability per class (probs (N, C)), and
    review "yes" where the top probability is below `review_below`."""
    rows = []
    for name, p in zip(names, probs):
        row = {"path": name, "predicted": classes[int(p.argmax())]}
        for c, v in zip(classes, p):
            row[c] = f"{float(v):.4f}"
        row["review"] = "yes" if p.max() < review_below else ""
        rows.append(row)
    return rows


def score_classes(names, probs, classes):
    """Accuracy and balanced accuracy of a <Class>/<image> folder of known classes, or None."""
    tops = [top_folder(name) for name in names]
    if not all(top in classes for top in tops):   # not a <Class>/<image> folder: nothing to score
        return None
    labels = torch.tensor([classes.index(top) for top in tops])
    conf = confusion_matrix(labels, probs.argmax(1), len(classes))
    return classification_metrics(conf, classes)


def predict_classes(model, ckpt, names, decode, masks, adapt_bn, batch_size, device, autocast,
                    tta=False, review_below=0.0):
    """(CSV rows: path, predicted class, a calibrated probability per class, review; the scores
    of a <Class>/<image> folder of known classes, or None)."""
    classes = ckpt["classes"]
    mask_mode = ckpt["args"].get("mask_mode", "loss")
    channel = mask_mode == "channel"
    white = ckpt["args"].get("white_balance", False)
    size = ckpt["args"]["size"]
    guide = guide_for(mask_mode, size)   # input, crop: the mask limits what the model sees
    images, _ = decode(size)
    if masks is not None:   # drawn at the masker's size
        masks = resize_masks(masks, size)
    model.to(device, memory_format=torch.channels_last)
    if adapt_bn:
        adapt_batchnorm(model, images, masks, batch_size, device, channel, white, guide)
    logits = infer(model, images, masks, batch_size, device, autocast, channel, white, guide, tta)
    temperature = ckpt.get("temperature", 1.0)   # fitted on the run's --holdout (1: none)
    probs = (logits / temperature).softmax(1)   # (N, C)
    rows = csv_rows(names, probs, classes, review_below)
    return rows, score_classes(names, probs, classes)


def decoder(paths):
    """decode(size): the images at `size` (N, 3, S, S) uint8 and their (w, h), decoded once for
    both models."""
    decoded = {}

    def decode(size):
        if size not in decoded:
            images, shapes, bad = decode_all("image", paths, size, log=print)
            if bad:
                first = min(bad)
                raise DataError(f"{len(bad)} unreadable image(s), e.g. {paths[first]}: "
                                f"{bad[first]}")
            decoded[size] = torch.from_numpy(images), shapes
        return decoded[size]
    return decode


def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")   # undecodable name bytes print as \udcff
    start = time.perf_counter()
    device = torch.device(args.device)
    amp = pick_amp(device)   # the trainers' rule for this device, whatever the runs trained with
    # inference: fp16 needs no grad scaler
    autocast = torch.autocast(device.type, AMP_DTYPES[amp], enabled=amp != "off")
    models = load_models(args.masker, args.classifier)
    folder = Path(args.folder)
    out = Path(args.out)
    paths = find_inputs(folder, out, "masker" in models, args.adapt_bn)
    names = [str(p.relative_to(folder)) for p in paths]
    claim_folder(out)   # one predict.py at a time in --out
    check_out(out)
    stage = out / ".predict.new"   # this run's masks and overlays, swapped in whole at the end
    shutil.rmtree(stage, ignore_errors=True)
    print(f"{len(paths)} images under {folder} | {' and '.join(models)} | adapt BN {args.adapt_bn} "
          f"| tta {args.tta} | device {device}")
    decode = decoder(paths)
    scores = {}
    masks = None
    rows = None
    # 1. masks (the classifier may see them: --mask-mode channel, input, crop)
    if "masker" in models:
        model, ckpt = models["masker"]
        masks, score = predict_masks(model, ckpt, paths, names, folder, decode, stage,
                                     args.adapt_bn, args.batch_size, device, autocast, args.tta)
        if score:
            scores["masker"] = score
    # 2. classes
    if "classifier" in models:
        model, ckpt = models["classifier"]
        mask_mode = ckpt["args"].get("mask_mode", "loss")
        if mask_mode != "loss" and masks is None:   # channel, input, crop
            raise SystemExit(f"{args.classifier}: --mask-mode {mask_mode} sees the cell's mask: "
                             "give --masker")
        rows, score = predict_classes(model, ckpt, names, decode, masks, args.adapt_bn,
                                      args.batch_size, device, autocast, args.tta,
                                      args.review_below)
        if score:
            scores["classifier"] = score
    # 3. report
    replace_outputs(out, stage, rows, scores)
    report(scores, rows, "masker" in models, out, time.perf_counter() - start, args.review_below)
    return scores


def report(scores, rows, masked, out, seconds, review_below):
    """The scores, one line a model, how many images --review-below flagged, and what was
    written."""
    for kind, metrics in scores.items():
        if kind == "classifier":
            print(f"classifier: accuracy {100 * metrics['accuracy']:.2f}% | "
                  f"balanced {100 * metrics['balanced_accuracy']:.2f}%")
        else:
            print(f"masker: Dice {metrics['dice']:.3f} | IoU {metrics['iou']:.3f} (pooled over "
                  f"pixels) | mean Dice per image {metrics['mean_image_dice']:.3f} on "
                  f"{metrics['n']} masks")
    wrote = []
    if rows:
        wrote.append("predictions.csv")
    if rows and review_below:   # without the flag no image is ever flagged
        flagged = sum(row["review"] == "yes" for row in rows)
        print(f"{flagged} of {len(rows)} image(s) flagged for review (top probability below "
              f"{review_below:g})")
    if masked:
        wrote += ["masks/", "overlays/"]
    if scores:
        wrote.append("scores.json")
    print(f"wrote {', '.join(wrote)} under {out} in {seconds:.1f}s")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:   # outputs are swapped in at the end: --out keeps the last run's
        sys.exit("interrupted: --out still holds the previous run's outputs, if any")
