"""Losses and metrics of the two-stage WBC system: every number the scripts print comes from here,
and test_losses.py checks each by hand on tiny tensors.

The report's two losses:
    center_bce(logits, target)       masker: mean(w * BCE), w = 1 - d/d_max rescaled to mean 1
    mask_weighted_ce(L, y, mask, alpha, class_w)
                                     classifier: CE at every location of the logit map L
                                     (B, C, h, w), weighted by (a1*mask + a2)
Baselines: bce (plain BCE), weighted_ce (CE of the pooled logits), class_weights (1/count,
--balance).
Metrics: confusion_matrix, classification_metrics, mask_counts, mask_metrics, mean_image_dice.
Guidance and audit: rrr_penalty, cohen_kappa. Calibration: fit_temperature, calibration_metrics.
A classifier's whole score (train_classifier.py, evaluate.py): classifier_scores.
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- the report's losses

def center_weights(h, w, device=None):
    """(h, w) weights 1 - d/d_max, rescaled to mean 1.

    d is the distance from a pixel centre to the image centre, d_max that of a corner pixel,
    so the corner pixels weigh 0 and the centre, where the cell sits, weighs most.
    """
    ys = torch.arange(h, device=device) + 0.5 - h / 2   # (h,) float: pixel centre to image centre
    xs = torch.arange(w, device=device) + 0.5 - w / 2   # (w,)
    d = torch.sqrt(ys[:, None] ** 2 + xs ** 2)          # (h, w)
    d_max = d[0, 0]
    if (d == d_max).all():  # 1x1, 1x2, 2x2: every pixel a corner, none nearer the centre
        return torch.ones_like(d)
    weight = 1 - d / d_max
    return weight / weight.mean()


def center_bce(logits, target):
    """mean(w * BCE) with w = center_weights(H, W). logits, target: (B, 1, H, W)."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    weight = center_weights(*logits.shape[-2:], device=logits.device)       # (H, W)
    return (per_pixel * weight).mean()


def check_alpha(a1, a2):
    """None if w = a1*m + a2 is finite, >= 0 for every m in [0, 1] and not always 0; else what
    is wrong."""
    if not (math.isfinite(a1) and math.isfinite(a2)):
        return f"alpha ({a1:g}, {a2:g}): must be finite numbers"
    if a2 < 0 or a1 + a2 < 0:   # w is linear in m: its ends m = 0 and m = 1 bound it
        return (f"alpha ({a1:g}, {a2:g}) gives negative weights (a1*m + a2 must be >= 0 for "
                f"every m in [0, 1]: need a2 >= 0 and a1 + a2 >= 0)")
    if a1 == 0 and a2 == 0:
        return "alpha (0, 0) weighs every location 0: nothing would be learned"
    return None


def mask_weighted_ce(logit_map, labels, mask, alpha, class_w=None, all_sum=None):
    """The report's (a1*mask + a2) weighted cross-entropy.

    logit_map (B, C, h, w); labels (B,) int; mask (B, 1, H, W) in [0, 1]; alpha (a1, a2);
    class_w (C,) or None. Returns (loss, n_empty): n_empty counts the samples whose weights
    sum to 0 (e.g. an empty mask under (1, 0)); they add nothing to the loss and are left
    out of its denominator. A tensor, so counting costs no host sync.
    all_sum: data parallelism's sum over every process (an all-reduce); the loss is then
    this process's share, its numerator over the denominator of the whole batch.
    """
    a1, a2 = alpha
    cell = F.adaptive_avg_pool2d(mask.float(), logit_map.shape[-2:])[:, 0]   # (B, h, w) fraction
    weight = a1 * cell + a2                                    # (B, h, w)
    targets = labels[:, None, None].expand_as(weight)          # (B, h, w) the image's label
    ce = F.cross_entropy(logit_map.float(), targets, reduction="none")       # (B, h, w)
    weight_sum = weight.sum((1, 2))                            # (B,)
    per_sample = (weight * ce).sum((1, 2)) / weight_sum.clamp_min(1e-12)     # (B,)
    kept = sample_weights(labels, class_w) * (weight_sum > 0)  # 0/0 loss: out of the mean
    n_empty = (weight_sum <= 0).sum()
    return share_of_mean(per_sample, kept, all_sum), n_empty


def sample_weights(labels, class_w):
    """(B,) float: class_w[y] of each sample's class y; all 1 when class_w is None."""
    if class_w is None:
        return torch.ones_like(labels, dtype=torch.float32)
    return class_w[labels].float()


def share_of_mean(values, weights, all_sum=None):
    """Σ weights·values / Σ weights, the denominator summed by all_sum over every process
    (None: this batch alone). Summed over the processes, the shares give the whole batch's
    weighted mean; a denominator of 0 gives 0."""
    denominator = weights.sum().detach()   # a normaliser, not something to learn from
    if all_sum is not None:
        denominator = all_sum(denominator)
    return (weights * values).sum() / denominator.clamp_min(1e-12)


# ---------------------------------------------------------------------------- baselines

def bce(logits, target):
    """Mean binary cross-entropy. logits, target: (B, 1, H, W); target in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


MASKER_LOSSES = {"bce": bce, "center": center_bce}


def weighted_ce(logits, labels, class_w=None, all_sum=None):
    """Cross-entropy of the pooled logits (B, C), each sample weighted by class_w[y] and
    normalised by the sum of those weights: the no-mask baseline. Not mask_weighted_ce at
    alpha (0, 1): that is the mean of the per-location CE, which equals this only for a 1x1
    logit map (a mean of CEs is not the CE of the mean logits). all_sum: as in
    mask_weighted_ce (this process's share of the batch's loss)."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")   # (B,)
    return share_of_mean(per_sample, sample_weights(labels, class_w), all_sum)


def class_weights(counts):
    """(C,) float: 1/count for each class, rescaled to mean 1 over the classes present.

    counts: sequence of training-image counts per class. A class with no training image gets
    weight 0 (it can't be predicted anyway) instead of an infinite one.
    """
    counts = torch.as_tensor(counts, dtype=torch.float32)
    present = counts > 0
    if not present.any():
        raise ValueError("class_weights: every class count is 0")
    weight = torch.zeros_like(counts)
    weight[present] = 1 / counts[present]
    return weight / weight[present].mean()


# ---------------------------------------------------------------------------- metrics

def confusion_matrix(labels, preds, num_classes):
    """(C, C) int64 counts; rows are true classes, columns predictions."""
    cell = labels.long().cpu() * num_classes + preds.long().cpu()   # (N,) row-major cell index
    counts = torch.bincount(cell, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def classification_metrics(confusion, classes):
    """Plain-float metrics from a (C, C) confusion matrix (rows true).

    per_class_error is None for a class with no true sample; the std of the per-class errors is
    the population std over classes with samples (it reproduces the report's 6.45 and 3.79).
    majority_baseline is the accuracy of always predicting the most frequent true class.
    macro_f1 averages over classes that occur as truth or prediction (as scikit-learn does).
    """
    conf = confusion.double()
    support = conf.sum(1)      # (C,) true samples of each class
    predicted = conf.sum(0)    # (C,) predictions of each class
    correct = conf.diag()      # (C,)
    total = int(support.sum())
    if total == 0:
        raise ValueError("classification_metrics: empty confusion matrix")
    # a class never true (or never predicted) has correct = 0: its clamped ratio is 0, not 0/0
    recall = correct / support.clamp_min(1)
    precision = correct / predicted.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    has = support > 0
    occurs = has | (predicted > 0)
    errors = 1 - recall
    accuracy = correct.sum().item() / total
    return {
        "n": total,
        "accuracy": accuracy,
        "weighted_mean_error": 1 - accuracy,
        "per_class_error": {
            c: errors[i].item() if has[i] else None   # None: no true sample to be wrong about
            for i, c in enumerate(classes)
        },
        "per_class_error_std": errors[has].std(unbiased=False).item(),
        "balanced_accuracy": recall[has].mean().item(),
        "macro_f1": f1[occurs].mean().item(),
        "majority_baseline": support.max().item() / total,
        "support": dict(zip(classes, support.long().tolist())),
        "confusion": confusion.long().tolist()
    }


def mask_counts(pred, target):
    """(4,) int64 [tp, fp, fn, tn] of the cell class; pred, target: bool tensors of one shape."""
    pred = pred.bool()
    target = target.bool()
    return torch.stack([
        (pred & target).sum(),     # tp
        (pred & ~target).sum(),    # fp
        (~pred & target).sum(),    # fn
        (~pred & ~target).sum()    # tn
    ])


def mask_metrics(counts):
    """pixel_error, iou, dice of the cell class from [tp, fp, fn, tn] counts (plain floats).
    Pooled: the counts are summed over every pixel of every image, so a large cell weighs more
    than a small one (mean_image_dice weighs each image once). IoU and Dice are 1 when neither
    prediction nor truth has a cell pixel."""
    tp, fp, fn, tn = map(float, counts)
    total = tp + fp + fn + tn
    if total == 0:
        raise ValueError("mask_metrics: no pixels counted")
    union = tp + fp + fn
    return {
        "pixel_error": (fp + fn) / total,
        "iou": tp / union if union else 1.0,
        "dice": 2 * tp / (tp + union) if union else 1.0   # 2 tp / (2 tp + fp + fn)
    }


def mean_image_dice(pred, target):
    """The mean over images of each image's Dice of the cell class (the usual figure in
    segmentation papers); pred, target: bool (N, ...) tensors of one shape. An image with a cell
    pixel in neither counts 1, as in mask_metrics. A plain float."""
    pred = pred.bool().flatten(1)                                  # (N, P)
    target = target.bool().flatten(1)                              # (N, P)
    tp = (pred & target).sum(1).double()                           # (N,)
    both = (pred.sum(1) + target.sum(1)).double()                 # (N,) 2 tp + fp + fn
    dice = torch.where(both > 0, 2 * tp / both.clamp_min(1), 1.0)  # (N,)
    return dice.mean().item()


# ---------------------------------------------------------------------------- guidance and audit

def rrr_penalty(logits, x, outside, has_mask, all_sum=None):
    """"Right for the right reasons" (Ross et al. 2017): how much the input outside the cell moves
    the prediction.

    logits (B, C) computed from x (B, 3, H, W), which requires grad; outside (B, 1, H, W) is 1
    where the model should not look; has_mask (B,) bool; all_sum as share_of_mean's. Per image:
    sum over pixels and channels of (outside * d(sum_c log p_c)/dx)^2; the mean over the images
    with a mask. The gradient keeps its graph (create_graph=True), so the penalty itself trains
    the model (double backprop)."""
    log_p = F.log_softmax(logits.float(), dim=1).sum()
    grad = torch.autograd.grad(log_p, x, create_graph=True)[0]   # (B, 3, H, W)
    looked = outside * grad                                      # where it should not look
    per_image = (looked ** 2).sum((1, 2, 3))                     # (B,)
    return share_of_mean(per_image, has_mask.float(), all_sum)   # images without a mask weigh 0


def cohen_kappa(first, second, num_classes):
    """Agreement of two labelings of the same images, beyond chance: (p_o - p_e) / (1 - p_e).

    p_o is the share that agree, p_e the share two independent labelings with these class
    shares would agree by chance. 1: always agree; 0: chance; a model that says one class on
    every image scores 0 whatever its raw agreement. Two identical constant labelings give 1."""
    counts = confusion_matrix(first, second, num_classes).double()   # (C, C)
    shares = counts / counts.sum()
    observed = shares.trace()
    chance = shares.sum(0) @ shares.sum(1)   # Σ_c P(first says c) P(second says c)
    if chance == 1:   # one class in both labelings: agreement is certain, not 0/0
        return 1.0
    return ((observed - chance) / (1 - chance)).item()


# ---------------------------------------------------------------------------- calibration

def fit_temperature(logits, labels, steps=100):
    """The one temperature T > 0 that minimises the NLL of softmax(logits / T) (Guo et al. 2017).

    logits (N, C) of held-out images, labels (N,). T is fitted as log T, so it stays positive;
    T > 1 softens over-confident probabilities. Dividing by T never changes the argmax."""
    logits = logits.detach().float().clone()   # infer()'s are inference tensors: no autograd
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.exp().item()


def reliability_bins(probs, labels, bins=15):
    """The reliability diagram's counts of probabilities (N, C) against labels (N,): the images
    fall into `bins` equal-width bins of their top probability; per bin (bins,) each: the
    images, their summed top probability, their correct predictions."""
    confidence, predicted = probs.double().max(1)
    correct = (predicted == labels).double()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1   # b holds (b/bins, (b+1)/bins]
    count = torch.bincount(which, minlength=bins)
    confidence_sum = confidence.new_zeros(bins).index_add(0, which, confidence)
    correct_sum = correct.new_zeros(bins).index_add(0, which, correct)
    return count, confidence_sum, correct_sum


def calibration_metrics(probs, labels, bins=15):
    """NLL, Brier score and expected calibration error of probabilities (N, C) against labels
    (N,).

    ECE: each of reliability_bins' bins adds its share of images times |its accuracy - its mean
    top probability| (Guo et al. 2017)."""
    probs = probs.double()
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels)   # mean -log p of the true class
    one_hot = F.one_hot(labels, probs.shape[1])                # (N, C)
    brier = ((probs - one_hot) ** 2).sum(1).mean()
    _, confidence_sum, correct_sum = reliability_bins(probs, labels, bins)
    # a bin's share n_b / N times |its accuracy - its mean confidence| is |its summed gap| / N
    ece = (correct_sum - confidence_sum).abs().sum() / len(labels)
    return {
        "nll": nll.item(),
        "brier": brier.item(),
        "ece": ece.item()
    }


def calibration(logits, labels, temperature):
    """calibration_metrics of softmax(logits (N, C)) against labels (N,), before and after
    dividing the logits by `temperature`."""
    before = calibration_metrics(logits.softmax(1), labels)
    after = calibration_metrics((logits / temperature).softmax(1), labels)
    return {"temperature": temperature, "before": before, "after": after}


def classifier_scores(logits, labels, classes, temperature):
    """classification_metrics of logits (N, C) against labels (N,), with their calibration before
    and after `temperature` (key "calibration")."""
    confusion = confusion_matrix(labels, logits.argmax(1), len(classes))
    metrics = classification_metrics(confusion, classes)
    metrics["calibration"] = calibration(logits, labels, temperature)
    return metrics
