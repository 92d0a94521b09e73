"""Issue 4's compute path: the speed flags reach the model, the batches and the log, the fp16
grad scaler steps like plain fp32, and the fast path trains the same model as the plain one."""
import argparse
import csv

import pytest
import torch

import train_classifier
from data import Compute, add_compute_args, make_batch, optimizer_step
from resnet_cls import build_classifier
from test_robustness import run_argv, tiny_wbc


def flags(*argv):
    parser = argparse.ArgumentParser()
    add_compute_args(parser)
    return parser.parse_args(list(argv))


def linear_pair(seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_scaled_step_equals_plain_step(clip):
    """Scale 2**16, backward, unscale (before clipping), step: the same update as without a scaler."""
    plain, scaled = linear_pair()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=True)
    for model, s in ((plain, None), (scaled, scaler)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        optimizer_step(torch.nn.functional.cross_entropy(model(x), y), model, opt, clip, s)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not torch.equal(plain.weight, linear_pair()[0].weight)   # a step was taken


def test_scaler_skips_a_step_with_inf_gradients_and_lowers_its_scale():
    model, before = linear_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer_step(model(torch.full((1, 4), float("inf"))).sum(), model, opt, 0.0, scaler)
    assert torch.equal(model.weight, before.weight) and torch.equal(model.bias, before.bias)
    assert scaler.get_scale() == 512.0


def test_compute_settings_memory_format_and_adam():
    on, off = Compute(flags(), torch.device("cpu")), Compute(flags("--channels-last", "off", "--adam", "loop"),
                                                              torch.device("cpu"))
    assert on.settings["channels_last"] == "on" and on.adam_impl == "foreach" and not on.scaler.is_enabled()
    assert on.settings["tf32"] == "n/a (cpu)"   # CUDA-only switches are not claimed on the CPU
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    idx = torch.arange(4)
    x_on, _ = make_batch(images, None, idx, "cpu", False, memory_format=on.memory_format)
    x_off, _ = make_batch(images, None, idx, "cpu", False, memory_format=off.memory_format)
    assert x_on.is_contiguous(memory_format=torch.channels_last) and x_off.is_contiguous()
    assert torch.equal(x_on, x_off)   # same values, other layout
    opt = off.adam(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    assert opt.defaults["foreach"] is False and not opt.defaults["fused"]
    assert Compute(flags("--amp", "fp16"), torch.device("cpu")).scaler.is_enabled()


def test_compile_swaps_methods_not_weights():
    """--compile replaces forward/forward_map on the instance (compiled lazily, on first call), so
    checkpoints keep their plain state_dict keys."""
    model = Compute(flags("--compile"), torch.device("cpu")).prepare(build_classifier(5), ("forward", "forward_map"))
    plain = build_classifier(5)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert "forward_map" in vars(model) and "forward" in vars(model)


def train_losses(path):
    with open(path) as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def test_fast_and_plain_paths_train_the_same_model(tmp_path, capsys):
    """channels_last + foreach Adam against NCHW + for-loop Adam, same seed: the same losses up to
    float rounding, which later steps amplify a little (still far below seed noise), and each
    run's log names its compute path."""
    root = tiny_wbc(tmp_path / "wbc")
    runs = {}
    for name, extra in (("fast", ()), ("plain", ("--channels-last", "off", "--adam", "loop"))):
        out = tmp_path / name
        metrics = train_classifier.main(run_argv(root, out, "--epochs", "3", "--batch-size", "6", *extra))
        runs[name] = (metrics, train_losses(out / "log.csv"), capsys.readouterr().out)
    (fast, fast_loss, fast_log), (plain, plain_loss, plain_log) = runs["fast"], runs["plain"]
    assert "compute: autocast off (fp32) | grad scaler off | channels last on" in fast_log
    assert "channels last off" in plain_log and "adam loop" in plain_log
    assert fast["compute"]["adam"] == "foreach" and plain["compute"]["adam"] == "loop"
    assert fast_loss[0] == pytest.approx(plain_loss[0], rel=1e-4)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-2, abs=1e-3)
    assert fast["accuracy"] == plain["accuracy"]


def test_dry_run_defaults_never_touch_a_real_runs_files():
    """A --dry-run (one batch: useless masks) writes and reads runs/dry_run/..., so a later real
    classifier does not pick up its masks from the default folder."""
    import train_masker
    real, dry = train_masker.parse_args([]), train_masker.parse_args(["--dry-run"])
    assert str(real.out) == "runs/masker_WBC_10" and str(dry.out) == "runs/dry_run/masker_WBC_10"
    cls = train_classifier.parse_args(["--alpha", "-1", "1", "--dry-run"])
    assert str(cls.masks) == "runs/dry_run/masker_WBC_10/masks"
    assert str(cls.out) == "runs/dry_run/classifier_WBC_10_alpha-1_1"
    assert str(train_classifier.parse_args(["--alpha", "-1", "1"]).masks) == "runs/masker_WBC_10/masks"
