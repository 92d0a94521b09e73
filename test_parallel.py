"""Data-parallel training: `torchrun --nproc-per-node 2` (gloo, CPU) against one process, for both trainers.

A small wrapper (written below, run as the script torchrun starts) calls the trainer's main() and records, per
process: the images of every batch it trained on, every file it wrote, and its final weights. BatchNorm is not
synced across processes, so N processes equal one process whose BatchNorm takes its statistics over each
process's rows separately ("ghost batches"); the wrapper can emulate that in one process (GHOST_BN=N).
"""
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_classifier
import train_masker
from data import DataError, make_batch
from losses import class_weights, mask_weighted_ce, weighted_ce
from test_robustness import tiny_wbc

HERE = Path(__file__).parent
WRAPPER = '''
import importlib, json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, os.environ["REPO"])
import data
trainer = importlib.import_module(sys.argv[1])
rank, record = int(os.environ.get("RANK", 0)), Path(os.environ["RECORD"])
seen, writes, models = [], [], []
make_batch, atomic_write, claim_folder = trainer.make_batch, data.atomic_write, trainer.claim_folder
def recording_make_batch(images, masks, idx, *a, part=slice(None), **k):
    seen.append(idx[part].tolist())
    return make_batch(images, masks, idx, *a, part=part, **k)
trainer.make_batch = recording_make_batch
data.atomic_write = lambda path, write: (writes.append(str(path)), atomic_write(path, write))
trainer.claim_folder = lambda out: (writes.append(f"lock {out}"), claim_folder(out))
name = "build_classifier" if sys.argv[1] == "train_classifier" else "UNet"
build = getattr(trainer, name)
setattr(trainer, name, lambda *a, **k: models.append(build(*a, **k)) or models[-1])
if os.environ.get("GHOST_BN"):   # statistics over each process's rows separately, in one process
    norm = torch.nn.modules.batchnorm._BatchNorm.forward
    torch.nn.modules.batchnorm._BatchNorm.forward = lambda self, x: torch.cat(
        [norm(self, c) for c in x.chunk(int(os.environ["GHOST_BN"]))]) if self.training else norm(self, x)
if os.environ.get("NAN_ON_RANK") == str(rank):   # a NaN loss here alone; the gradients stay finite
    mask_weighted_ce = trainer.mask_weighted_ce
    def nan_loss(*a, **k):
        loss, n_empty = mask_weighted_ce(*a, **k)
        return loss + float("nan"), n_empty
    trainer.mask_weighted_ce = nan_loss
if os.environ.get("DIE_AFTER_EPOCH") and rank == 0:   # a kill right after that epoch's checkpoint
    save = trainer.save_checkpoint
    def save_then_die(state, path):
        save(state, path)
        if state["epoch"] == int(os.environ["DIE_AFTER_EPOCH"]) and not state["finished"]:
            os._exit(9)
    trainer.save_checkpoint = save_then_die
try:
    trainer.main(sys.argv[2:])
except data.DataError as e:   # as the trainer's __main__ ends
    sys.exit(f"error: {e}")
finally:
    record.mkdir(parents=True, exist_ok=True)
    (record / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "writes": writes}))
    if models:   # a run refused before its model was built has none
        torch.save(models[0].state_dict(), record / f"rank{rank}.pt")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """16 training images (11 of A, 5 of B: --balance weighs them apart), each with a mask, 3
    of them all cell (their --alpha -1 1 weights sum to 0), 4 val, and the wrapper."""
    root = tmp_path_factory.mktemp("parallel")
    tiny_wbc(root / "wbc", n_train=8, n_val=2)
    train = root / "wbc" / "WBC_100" / "train"
    all_cell = Image.fromarray(np.full((40, 40), 255, np.uint8))
    for i in range(3):
        for kind in ("data", "mask"):
            name = f"train_B_{i}.png"
            (train / kind / "B" / name).rename(train / kind / "A" / name)
        all_cell.save(train / "mask" / "A" / f"train_A_{i}.png")
    (root / "wrapper.py").write_text(WRAPPER)
    return root


def trainer_argv(root, out, script, *extra):
    """The flags of every run here: a tiny CPU run into `out`."""
    epochs = "2" if script == "train_classifier" else "1"
    argv = ["--data", str(root / "wbc"), "--split", "100", "--size", "64", "--batch-size", "8",
            "--save-every", "1", "--epochs", epochs, "--device", "cpu", "--amp", "off",
            "--cache", "none", "--out", str(out), *extra]
    if script == "train_classifier":
        argv += ["--alpha", "-1", "1", "--balance", "--masks", str(root / "wbc" / "gen")]
    return argv


def run(setup, name, script, *extra, procs=1, **env):
    """The wrapped trainer in `procs` processes (torchrun if more than one); (returncode, output, record folder)."""
    root, record = setup, setup / "records" / name
    shutil.rmtree(record, ignore_errors=True)
    argv = trainer_argv(root, root / "out" / name, script, *extra)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)] if procs > 1 else \
        [sys.executable]
    env = dict(os.environ, REPO=str(HERE), RECORD=str(record), OMP_NUM_THREADS="1", **env)
    done = subprocess.run(launcher + [str(root / "wrapper.py"), script] + argv,
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr, record


def load(record, rank=0):
    weights = torch.load(record / f"rank{rank}.pt", weights_only=True)
    return json.loads((record / f"rank{rank}.json").read_text()), weights


def first_row(out):
    """The first row of a run's log.csv, as floats."""
    with open(out / "log.csv") as f:
        return {k: float(v) for k, v in next(csv.DictReader(f)).items() if k != "stage"}


def share_differing(a, b, tol=1e-4):
    """The share of parameters (not BatchNorm's running statistics) that differ by more than tol."""
    keys = [k for k in a if "running_" not in k and "num_batches" not in k]
    return sum(((a[k] - b[k]).abs() > tol).sum().item() for k in keys) / sum(a[k].numel() for k in keys)


@pytest.fixture(scope="module")
def ddp(setup):
    """Each trainer's run on 2 processes (the classifier's is also the unbroken run the resume test compares to)."""
    records = {}
    for script in ("train_classifier", "train_masker"):
        code, out, records[script] = run(setup, f"{script}_ddp", script, procs=2)
        assert code == 0, out[-3000:]
    return records


@pytest.mark.parametrize("script", ["train_classifier", "train_masker"])
def test_two_processes_split_each_batch_and_match_one_process(setup, ddp, script):
    (rec0, w0), (rec1, w1) = load(ddp[script], 0), load(ddp[script], 1)
    code, out, ghost = run(setup, f"{script}_ghost", script, GHOST_BN="2")
    assert code == 0, out[-3000:]
    one, w_ghost = load(ghost)

    # each batch of the one-process run is split in two: disjoint halves, rank 0 the first, covering it exactly
    assert len(rec0["seen"]) == len(rec1["seen"]) == len(one["seen"]) >= 2
    for mine, theirs, whole in zip(rec0["seen"], rec1["seen"], one["seen"]):
        assert mine + theirs == whole and not set(mine) & set(theirs) and len(mine) == len(theirs) == 4
    # one model: every weight equal on both ranks (BatchNorm's running statistics are each process's own; DDP
    # copies rank 0's to the others before each step, and rank 0 saves them)
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if "running_" not in k and "num_batches" not in k)
    # rank 0 alone wrote (its lock, checkpoint, log, metrics and, for the masker, the masks); rank 1 nothing
    assert rec1["writes"] == []
    wrote = {Path(w.split()[-1]).name for w in rec0["writes"]}
    assert {"checkpoint.pt", "log.csv", "metrics.json"} <= wrote and (script == "train_classifier" or any(
        w.endswith(".png") for w in rec0["writes"]))
    # the one-process loss: epoch 1's train loss equal to rounding (with --balance and zero-weight
    # samples, it was 1% off before the loss's denominators were summed over the processes)
    column = "train_loss" if script == "train_classifier" else "loss"
    first = [first_row(setup / "out" / f"{script}_{kind}")[column] for kind in ("ddp", "ghost")]
    assert math.isclose(*first, rel_tol=1e-5)
    # to rounding, two processes are one process with ghost BatchNorm batches of 4: under 1% of
    # the weights differ by over 1e-3 (measured: 0.02% classifier, 0% masker; 26% of the
    # classifier's before the denominators were summed). Tiny runs are chaotic: Adam turns
    # rounding-sized gradients into lr-sized steps (3% differ by over 1e-4)
    assert share_differing(w0, w_ghost, tol=1e-3) < 0.01


def test_one_process_with_batchnorm_over_the_whole_batch_differs(setup, ddp):
    """The control: the ghost BatchNorm is what makes the runs agree (measured: 96% of the weights differ)."""
    code, out, plain = run(setup, "train_classifier_plain", "train_classifier")
    assert code == 0, out[-3000:]
    assert share_differing(load(ddp["train_classifier"])[1], load(plain)[1]) > 0.5


def test_resume_under_torchrun_continues_bit_identically(setup, ddp):
    code, out, _ = run(setup, "resume", "train_classifier", procs=2, DIE_AFTER_EPOCH="1")
    assert code != 0 and not (setup / "out" / "resume" / "metrics.json").exists()
    # one process (this one, on a copy) would train other BatchNorm batches: refused in one line
    # naming both counts
    copy = setup / "out" / "resume_one_process"
    copy.mkdir()
    shutil.copy(setup / "out" / "resume" / "checkpoint.pt", copy)
    with pytest.raises(SystemExit) as refused:
        train_classifier.main(trainer_argv(setup, copy, "train_classifier", "--resume"))
    expected = (r"--resume: \S+ was trained by 2 process\(es\), this run has 1 process\(es\); "
                r"resume with torchrun --nproc-per-node 2")
    assert re.fullmatch(expected, str(refused.value))
    code, out, resumed = run(setup, "resume", "train_classifier", "--resume", procs=2)
    assert code == 0 and "epoch 2/2" in out and "epoch 1/2" not in out, out[-3000:]
    (_, a), (_, b) = load(ddp["train_classifier"]), load(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_on_one_process_stops_every_process(setup):
    """Rank 1 alone sees a NaN loss (its gradients, and so every weight, stay finite): both stop
    after the epoch with the one-line error, and rank 0 saves no checkpoint of that epoch."""
    code, out, _ = run(setup, "nan", "train_classifier", procs=2, NAN_ON_RANK="1")
    assert code != 0 and "error: epoch 1/2 step 1: the loss is nan" in out, out[-3000:]
    assert 'wrapper.py", line' not in out   # no worker's traceback (torchrun adds its summary)
    assert not (setup / "out" / "nan" / "checkpoint.pt").exists()


class Rows:
    """uint8 images that record which rows are read (copied to the device)."""
    def __init__(self, tensor):
        self.tensor = tensor
        self.read = []

    def __getitem__(self, idx):
        self.read.append(torch.as_tensor(idx).tolist())
        return self.tensor[idx]


def test_each_process_copies_and_augments_only_its_rows(monkeypatch):
    """Rows 4..7 of a batch of 8: the pixels of one process's batch (the same random draws, the
    RNG left as it for the next batch), but only those 4 rows read and augmented."""
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    masks = (torch.rand(10, 1, 32, 32) > 0.5).to(torch.uint8)
    idx = torch.tensor([9, 0, 3, 5, 2, 8, 1, 7])
    aug = dict(zoom=(0.7, 1.1), stain=0.5, blur=1.0)
    torch.manual_seed(0)
    x_all, m_all = make_batch(images, masks, idx, "cpu", train=True, aug=aug, white=True)
    after_all = torch.get_rng_state()
    rows = Rows(images)
    sizes = []
    sample = torch.nn.functional.grid_sample

    def recording_sample(x, *a, **k):
        sizes.append(len(x))
        return sample(x, *a, **k)
    monkeypatch.setattr(torch.nn.functional, "grid_sample", recording_sample)
    torch.manual_seed(0)
    x, m = make_batch(rows, masks, idx, "cpu", train=True, aug=aug, white=True, part=slice(4, 8))
    assert torch.allclose(x, x_all[4:], atol=1e-6) and torch.equal(m, m_all[4:])
    assert torch.equal(torch.get_rng_state(), after_all)
    assert rows.read == [[2, 8, 1, 7]] and sizes == [4, 4]   # images, then masks: 4 rows each


def two_processes(loss_fn, *tensors):
    """The sum of loss_fn(*rows, all_sum) on each half of the batch, as two processes give it."""
    halves = [[t[:4] for t in tensors], [t[4:] for t in tensors]]
    denominators = []
    for rows in halves:   # what each process's all_sum contributes
        loss_fn(*rows, lambda t: denominators.append(t.detach()) or t)
    total = sum(denominators)
    return sum(loss_fn(*rows, lambda t: total) for rows in halves)


def test_loss_denominators_are_summed_over_processes():
    """With --balance and samples whose mask weights sum to 0, two processes' losses (each its
    numerator over the denominator summed over both) add up to one process's loss, and so do
    their gradients: DDP's average of the gradients of WORLD * loss is one process's."""
    torch.manual_seed(0)
    logit_map = torch.randn(8, 2, 2, 2, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])   # rank 0: three of A; rank 1: three of B
    mask = torch.zeros(8, 1, 8, 8)
    mask[:3] = 1   # under --alpha -1 1 these weigh 0: rank 0 keeps one sample
    class_w = class_weights([5, 2])

    def with_mask(logit_map, labels, mask, all_sum):
        return mask_weighted_ce(logit_map, labels, mask, (-1, 1), class_w, all_sum=all_sum)[0]

    def pooled(logit_map, labels, mask, all_sum):
        return weighted_ce(logit_map.mean((2, 3)), labels, class_w, all_sum=all_sum)
    for loss_fn in (with_mask, pooled):
        whole = loss_fn(logit_map, labels, mask, None)
        grad_whole, = torch.autograd.grad(whole, logit_map)
        split = two_processes(loss_fn, logit_map, labels, mask)
        grad_split, = torch.autograd.grad(split, logit_map)
        assert torch.allclose(split, whole) and torch.allclose(grad_split, grad_whole)


@pytest.mark.parametrize("trainer", [train_classifier, train_masker])
def test_nccl_syncs_batchnorm_and_pins_the_gpu_gloo_keeps_batchnorm(monkeypatch, trainer):
    """NCCL (a GPU a process): every BatchNorm becomes a SyncBatchNorm, DDP gets device_ids=[that
    GPU]; gloo (CPU; no SyncBatchNorm): BatchNorm stays each process's own. DDP is stubbed."""
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids: (
        model, device_ids))
    cases = (("gloo", "cpu", False, None), ("nccl", "cuda:1", True, [1]))
    for backend, device, synced, ids in cases:
        monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: backend)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        model, (wrapped, device_ids) = trainer.data_parallel(model, torch.device(device))
        assert wrapped is model and device_ids == ids
        assert isinstance(model[1], torch.nn.SyncBatchNorm) == synced


@pytest.mark.parametrize("trainer", [train_classifier, train_masker])
def test_a_set_giving_a_process_under_2_or_unequal_rows_is_refused(monkeypatch, capsys, trainer):
    """Under 3 processes: --batch-size must split evenly, and a set smaller than one batch (that
    one batch) too, with 2 rows or more each."""
    monkeypatch.setattr(trainer, "WORLD", 3)
    with pytest.raises(SystemExit) as refused:
        trainer.parse_args(["--batch-size", "8", "--device", "cpu"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert refused.value.code == 2
    assert "--batch-size 8: need a multiple of the 3 process(es)" in last
    trainer.check_rows(16, 12, "data")   # batches of 12 (4 rows each); 4 images left for later
    trainer.check_rows(15, 18, "data")   # one batch of 15: 5 rows each
    with pytest.raises(DataError, match="^data: 16 images .* --batch-size 18 .* 3 processes; "
                                        "use --batch-size 15$"):
        trainer.check_rows(16, 18, "data")
    with pytest.raises(DataError, match="^data: 5 image.* 3 process.* need 2 each .* "
                                        "--nproc-per-node 2 or fewer$"):
        trainer.check_rows(5, 6, "data")


@pytest.mark.parametrize("trainer", [train_classifier, train_masker])
def test_more_processes_than_gpus_is_refused(monkeypatch, tmp_path, trainer):
    """torchrun --nproc-per-node 2 on a one-GPU machine: the second process has no GPU."""
    monkeypatch.setattr(trainer, "WORLD", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as refused:
        trainer.main(["--device", "cuda", "--out", str(tmp_path / "out")])
    assert str(refused.value) == ("torchrun: 2 processes on this machine, which has 1 GPU(s); "
                                  "use --nproc-per-node 1 (or --device cpu)")
