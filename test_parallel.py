"""Data-parallel training: `torchrun --nproc-per-node 2` (gloo, CPU) against one process, for both trainers.

A small wrapper (written below, run as the script torchrun starts) calls the trainer's main() and records, per
process: the images of every batch it trained on, every file it wrote, and its final weights. BatchNorm is not
synced across processes, so N processes equal one process whose BatchNorm takes its statistics over each
process's rows separately ("ghost batches"); the wrapper can emulate that in one process (GHOST_BN=N).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
if os.environ.get("DIE_AFTER_EPOCH") and rank == 0:   # a kill right after that epoch's checkpoint
    save = trainer.save_checkpoint
    def save_then_die(state, path):
        save(state, path)
        if state["epoch"] == int(os.environ["DIE_AFTER_EPOCH"]) and not state["finished"]:
            os._exit(9)
    trainer.save_checkpoint = save_then_die
try:
    trainer.main(sys.argv[2:])
finally:
    record.mkdir(parents=True, exist_ok=True)
    (record / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "writes": writes}))
    torch.save(models[0].state_dict(), record / f"rank{rank}.pt")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """16 training images (8 a class, each with a mask), 4 val, and the wrapper."""
    root = tmp_path_factory.mktemp("parallel")
    tiny_wbc(root / "wbc", n_train=8, n_val=2)
    (root / "wrapper.py").write_text(WRAPPER)
    return root


def run(setup, name, script, *extra, procs=1, **env):
    """The wrapped trainer in `procs` processes (torchrun if more than one); (returncode, output, record folder)."""
    root, record = setup, setup / "records" / name
    shutil.rmtree(record, ignore_errors=True)
    argv = ["--data", str(root / "wbc"), "--split", "100", "--size", "64", "--batch-size", "8", "--save-every", "1",
            "--epochs", "2" if script == "train_classifier" else "1", "--device", "cpu", "--amp", "off", "--cache",
            "none", "--out", str(root / "out" / name), *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)] if procs > 1 else \
        [sys.executable]
    env = dict(os.environ, REPO=str(HERE), RECORD=str(record), OMP_NUM_THREADS="1", **env)
    done = subprocess.run(launcher + [str(root / "wrapper.py"), script] + argv + (["--alpha", "-1", "1", "--masks",
                          str(root / "wbc" / "gen")] if script == "train_classifier" else []),
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr, record


def load(record, rank=0):
    weights = torch.load(record / f"rank{rank}.pt", weights_only=True)
    return json.loads((record / f"rank{rank}.json").read_text()), weights


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
    # to rounding, two processes are one process with ghost BatchNorm batches of 4: under 2% of the weights differ by
    # over 1e-4 (measured: 0.01% classifier, 0.003% masker; Adam turns rounding-sized gradients into lr-sized steps)
    assert share_differing(w0, w_ghost) < 0.02


def test_one_process_with_batchnorm_over_the_whole_batch_differs(setup, ddp):
    """The control: the ghost BatchNorm is what makes the runs agree (measured: 96% of the weights differ)."""
    code, out, plain = run(setup, "train_classifier_plain", "train_classifier")
    assert code == 0, out[-3000:]
    assert share_differing(load(ddp["train_classifier"])[1], load(plain)[1]) > 0.5


def test_resume_under_torchrun_continues_bit_identically(setup, ddp):
    code, out, _ = run(setup, "resume", "train_classifier", procs=2, DIE_AFTER_EPOCH="1")
    assert code != 0 and not (setup / "out" / "resume" / "metrics.json").exists()
    code, out, resumed = run(setup, "resume", "train_classifier", "--resume", procs=2)
    assert code == 0 and "epoch 2/2" in out and "epoch 1/2" not in out, out[-3000:]
    (_, a), (_, b) = load(ddp["train_classifier"]), load(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
