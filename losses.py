"""Losses and metrics of the two-stage WBC system: every number the scripts print comes from here,
and test_losses.py checks each by hand on tiny tensors.

The report's two losses:
    center_bce(logits, target)                     masker: mean(w * BCE), w = 1 - d/d_max rescaled to mean 1
    mask_weighted_ce(L, y, mask, alpha, class_w)   classifier: CE at every location of the logit map L
                                                   (B, C, h, w), weighted by (a1*mask + a2)
Baselines: bce (plain BCE), weighted_ce (CE of the pooled logits), class_weights (1/count, --balance).
Metrics: confusion_matrix, classification_metrics, mask_counts, mask_metrics, mean_image_dice.
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
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5 - h / 2
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5 - w / 2
    d = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    d_max = d[0, 0]
    if (d == d_max).all():  # 1x1, 1x2, 2x2: every pixel a corner, none nearer the centre
        return torch.ones(h, w, device=device)
    weight = 1 - d / d_max
    return weight / weight.mean()


def center_bce(logits, target):
    """mean(w * BCE) with w = center_weights(H, W). logits, target: (B, 1, H, W)."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return (per_pixel * center_weights(*logits.shape[-2:], device=logits.device)).mean()


def check_alpha(a1, a2):
    """None if w = a1*m + a2 is finite, >= 0 for every m in [0, 1] and not always 0; else what is wrong."""
    if not (math.isfinite(a1) and math.isfinite(a2)):
        return f"alpha ({a1:g}, {a2:g}): must be finite numbers"
    if a2 < 0 or a1 + a2 < 0:
        return (f"alpha ({a1:g}, {a2:g}) gives negative weights (a1*m + a2 must be >= 0 for every m in [0, 1]: "
                f"need a2 >= 0 and a1 + a2 >= 0)")
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
    b, _, h, w = logit_map.shape
    m = F.adaptive_avg_pool2d(mask.float(), (h, w))[:, 0]           # (B, h, w) cell fraction
    weight = a1 * m + a2                                            # (B, h, w)
    ce = F.cross_entropy(logit_map.float(), labels[:, None, None].expand(b, h, w),
                         reduction="none")                          # (B, h, w)
    weight_sum = weight.sum((1, 2))                                 # (B,)
    per_sample = (weight * ce).sum((1, 2)) / weight_sum.clamp_min(1e-12)
    sample_w = torch.ones_like(per_sample) if class_w is None else class_w[labels].float()
    sample_w = sample_w * (weight_sum > 0)
    return share_of_mean(per_sample, sample_w, all_sum), (weight_sum <= 0).sum()


def share_of_mean(values, weights, all_sum=None):
    """Σ weights·values / Σ weights, the denominator summed by all_sum over every process
    (None: this batch alone). Summed over the processes, the shares give the whole batch's
    weighted mean; a denominator of 0 gives 0."""
    denominator = weights.sum().detach()                            # no gradient flows through it
    if all_sum is not None:
        denominator = all_sum(denominator)
    return (weights * values).sum() / denominator.clamp_min(1e-12)


# ---------------------------------------------------------------------------- baselines

def bce(logits, target):
    """Mean binary cross-entropy. logits, target: (B, 1, H, W); target in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


MASKER_LOSSES = {"bce": bce, "center": center_bce}


def weighted_ce(logits, labels, class_w=None, all_sum=None):
    """Cross-entropy of the pooled logits (B, C), each sample weighted by class_w[y] and normalised by the
    sum of those weights: the no-mask baseline. Not mask_weighted_ce at alpha (0, 1): that is the mean of
    the per-location CE, which equals this only for a 1x1 logit map (a mean of CEs is not the CE of the
    mean logits). all_sum: as in mask_weighted_ce (this process's share of the batch's loss)."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    sample_w = torch.ones_like(per_sample) if class_w is None else class_w[labels].float()
    return share_of_mean(per_sample, sample_w, all_sum)


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
    idx = labels.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def classification_metrics(confusion, classes):
    """Plain-float metrics from a (C, C) confusion matrix (rows true).

    per_class_error is None for a class with no true sample; the std of the per-class errors is
    the population std over classes with samples (it reproduces the report's 6.45 and 3.79).
    majority_baseline is the accuracy of always predicting the most frequent true class.
    macro_f1 averages over classes that occur as truth or prediction (as scikit-learn does).
    """
    conf = confusion.double()
    support, predicted, correct = conf.sum(1), conf.sum(0), conf.diag()
    total = support.sum().item()
    if total == 0:
        raise ValueError("classification_metrics: empty confusion matrix")
    has = support > 0
    recall = torch.where(has, correct / support.clamp_min(1), torch.zeros_like(correct))
    precision = torch.where(predicted > 0, correct / predicted.clamp_min(1), torch.zeros_like(correct))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(correct))
    occurs = has | (predicted > 0)
    errors = 1 - recall[has]
    return {
        "n": int(total),
        "accuracy": correct.sum().item() / total,
        "weighted_mean_error": 1 - correct.sum().item() / total,
        "per_class_error": {c: (1 - recall[i].item()) if has[i] else None for i, c in enumerate(classes)},
        "per_class_error_std": errors.std(unbiased=False).item(),
        "balanced_accuracy": recall[has].mean().item(),
        "macro_f1": f1[occurs].mean().item(),
        "majority_baseline": support.max().item() / total,
        "support": {c: int(support[i]) for i, c in enumerate(classes)},
        "confusion": confusion.long().tolist(),
    }


def mask_counts(pred, target):
    """(4,) int64 [tp, fp, fn, tn] of the cell class; pred, target: bool tensors of one shape."""
    pred, target = pred.bool(), target.bool()
    return torch.stack([(pred & target).sum(), (pred & ~target).sum(),
                        (~pred & target).sum(), (~pred & ~target).sum()])


def mask_metrics(counts):
    """pixel_error, iou, dice of the cell class from [tp, fp, fn, tn] counts (plain floats).
    Pooled: the counts are summed over every pixel of every image, so a large cell weighs more
    than a small one (mean_image_dice weighs each image once). IoU and Dice are 1 when neither
    prediction nor truth has a cell pixel."""
    tp, fp, fn, tn = (float(c) for c in counts)
    total = tp + fp + fn + tn
    if total == 0:
        raise ValueError("mask_metrics: no pixels counted")
    union = tp + fp + fn
    return {"pixel_error": (fp + fn) / total,
            "iou": tp / union if union else 1.0,
            "dice": 2 * tp / (2 * tp + fp + fn) if union else 1.0}


def mean_image_dice(pred, target):
    """The mean over images of each image's Dice of the cell class (the usual figure in
    segmentation papers); pred, target: bool (N, ...) tensors of one shape. An image with a cell
    pixel in neither counts 1, as in mask_metrics. A plain float."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)   # (N, P)
    tp = (pred & target).sum(1).double()
    both = pred.sum(1).double() + target.sum(1).double()               # 2 tp + fp + fn
    dice = torch.where(both > 0, 2 * tp / both.clamp_min(1), torch.ones_like(tp))
    return dice.mean().item()


# ---------------------------------------------------------------------------- guidance and audit

def rrr_penalty(logits, x, outside, has_mask):
    """"Right for the right reasons" (Ross et al. 2017): how much the input outside the cell moves
    the prediction.

    logits (B, C) computed from x (B, 3, H, W), which requires grad; outside (B, 1, H, W) is 1
    where the model should not look; has_mask (B,) bool. Per image: sum over pixels and channels
    of (outside * d(sum_c log p_c)/dx)^2; the mean over the images with a mask. The gradient keeps
    its graph (create_graph=True), so the penalty itself trains the model (double backprop)."""
    log_p = F.log_softmax(logits.float(), dim=1).sum()
    grad = torch.autograd.grad(log_p, x, create_graph=True)[0]
    per_image = ((outside * grad) ** 2).sum(dim=(1, 2, 3))
    count = has_mask.sum().clamp_min(1)
    return (per_image * has_mask).sum() / count


def cohen_kappa(first, second, num_classes):
    """Agreement of two labelings of the same images, beyond chance: (p_o - p_e) / (1 - p_e).

    p_o is the share that agree, p_e the share two independent labelings with these class
    shares would agree by chance. 1: always agree; 0: chance; a model that says one class on
    every image scores 0 whatever its raw agreement. Two identical constant labelings give 1."""
    table = confusion_matrix(first, second, num_classes).double()
    n = table.sum()
    observed = table.trace() / n
    chance = (table.sum(0) * table.sum(1)).sum() / n ** 2
    if chance == 1:
        return 1.0
    return ((observed - chance) / (1 - chance)).item()


# ---------------------------------------------------------------------------- calibration

def fit_temperature(logits, labels, steps=100):
    """The one temperature T > 0 that minimises the NLL of softmax(logits / T) (Guo et al. 2017).

    logits (N, C) of held-out images, labels (N,). T is fitted as log T, so it stays positive;
    T > 1 softens over-confident probabilities. Dividing by T never changes the argmax."""
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.exp().item()


def calibration_metrics(probs, labels, bins=15):
    """NLL, Brier score and expected calibration error of probabilities (N, C) against labels (N,).

    ECE: the images fall into `bins` equal-width bins of their top probability; each bin adds
    its share of images times |accuracy - mean top probability| (Guo et al. 2017)."""
    probs = probs.double()
    picked = probs[torch.arange(len(labels)), labels]
    nll = -picked.clamp_min(1e-12).log().mean()
    one_hot = F.one_hot(labels, probs.shape[1]).double()
    brier = ((probs - one_hot) ** 2).sum(1).mean()
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1   # bin b holds (b/bins, (b+1)/bins]
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap = (correct[inside].mean() - confidence[inside].mean()).abs()
            ece += inside.double().mean() * gap
    return {"nll": nll.item(), "brier": brier.item(), "ece": ece.item()}
