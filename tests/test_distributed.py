"""Runs under torchrun with two CPU processes (gloo): every rank trains under DDP, the masks
agree on every rank, and rank 0 alone tests, generates and writes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import dnnshrink_core as ds
from dnnshrink_core import distributed

# every torchrun here runs on one xdist worker, one after the other: two at once would need four cores
pytestmark = [pytest.mark.xdist_group("torchrun"), pytest.mark.heavy]

# Each rank records what it was given; test() may only run on rank 0.
FUNCTIONS = '''
import json, os
import torch
import torch.distributed as dist
from torch import nn

X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))

def conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 16), conv_bn(16, 16))
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))

def build():
    torch.manual_seed(0)
    return Net()

def record(what, model):
    rank = dist.get_rank() if dist.is_initialized() else -1
    with open(os.path.join(os.environ["CALLS_DIR"], f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps([what, type(model).__name__]) + "\\n")

def steps(model, lr, n):
    rank = dist.get_rank()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=bool(os.environ.get("INF_ON_RANK1")))
    for _ in range(n):
        opt.zero_grad()
        loss = model(X[rank::2]).square().mean()  # each rank its own half of the data
        if os.environ.get("INF_ON_RANK1") and rank == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)  # skipped on both ranks: DDP averaged the infinite gradients
        scaler.update()

def train_one_epoch(model, lr):
    record("train_one_epoch", model)
    steps(model, lr, 3)
    if os.environ.get("BREAK_DDP") and dist.get_rank() == 1:
        with torch.no_grad():  # behind DDP's back: rank 1's scales drift apart
            model.module.body[0][1].weight[:8] = 0.0

def train(model):
    record("train", model)
    steps(model, 0.01, 2)

def test(model):
    record("test", model)
    return "good" if os.environ.get("BAD_TEST") else 0.5
'''


def torchrun(*args, env=None, cwd=None, timeout=600):
    """Run dnnshrink under torchrun with two processes; a hang kills the whole process group."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dnnshrink_core", *map(str, args)]
    env = {**(env or os.environ), "DNNSHRINK_DIST_TIMEOUT": "120"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"torchrun {' '.join(map(str, args))} hung for {timeout} s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def setup_run(tmp_path, **extra):
    (tmp_path / "funcs.py").write_text(FUNCTIONS)
    config = {"model": "funcs.py:build", "functions": "funcs.py", "input_shape": [1, 3, 8, 8], "device": "cpu",
              "max_epochs": 40, "strength_scale": 20.0, "lr": 0.05, "train_baseline": True,
              "exporters": ["pytorch", "onnx"], **extra}
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    calls = tmp_path / "calls"
    calls.mkdir()
    return path, calls, {**os.environ, "CALLS_DIR": str(calls)}


def read_calls(calls, rank):
    path = calls / f"rank{rank}.jsonl"
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One run under torchrun that several tests read: trains every rank (baseline, five
    structure-learning epochs, fine-tuning), exports, and keeps its checkpoints."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    config, calls, env = setup_run(tmp_path, max_epochs=5, strength_scale=1e-6)
    run = torchrun("run", config, "--out", tmp_path / "out", "--quiet", env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return tmp_path, config, calls, run


def test_run_under_torchrun_trains_every_rank_under_ddp(ddp_run):
    tmp_path, _, calls, run = ddp_run
    rank0, rank1 = read_calls(calls, 0), read_calls(calls, 1)
    training = [c for c in rank0 if c[0] != "test"]
    # the user's training ran on both ranks, in step, always on the DDP wrapper
    assert training == rank1 and len(training) >= 3
    assert {c[1] for c in training} == {"DistributedDataParallel"}
    assert [c[0] for c in training][0] == "train" and [c[0] for c in training][-1] == "train"
    # test() only on rank 0, with the plain model: the baseline, then for TensorBoard the learned and
    # the generated model, then the fine-tuned one
    assert [c for c in rank0 if c[0] == "test"] == [("test", "Net")] * 4
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["distributed"]["world_size"] == 2
    first, second = report["distributed"]["mask_digests"]
    assert first == second
    assert report["shrunk"]["macs"] < report["baseline"]["macs"]
    loaded = ds.load(tmp_path / "out" / "model.dnnshrink")
    assert loaded(torch.randn(2, 3, 8, 8)).shape == (2, 2)
    assert (tmp_path / "out" / "model.onnx").is_file()
    # one process printed the results
    assert run.stdout.count("testing the shrunk model") == 1


def test_ranks_that_disagree_on_the_masks_stop_with_a_clear_error(tmp_path):
    config, calls, env = setup_run(tmp_path, max_epochs=2, strength_scale=1e-6, train_baseline=False,
                                   exporters=[])
    run = torchrun("run", config, "--out", tmp_path / "out", "--quiet", env={**env, "BREAK_DDP": "1"})
    assert run.returncode != 0
    assert "the ranks chose different channels (rank 0: " in run.stderr
    assert "[rank0]: Traceback" not in run.stderr and "[rank1]: Traceback" not in run.stderr
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.slow  # a minute of the default suite's four; the shards it relies on are checked below
def test_demo_under_torchrun(tmp_path):
    out = tmp_path / "demo"
    run = torchrun("demo", "--out", out, "--quiet")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"]["world_size"] == 2
    assert len(set(report["distributed"]["mask_digests"])) == 1
    assert report["shrunk"]["macs"] <= 0.6 * report["baseline"]["macs"]
    assert report["shrunk"]["score"] >= report["baseline"]["score"] - 0.01
    assert ds.load(out / "model.dnnshrink")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


SHARDS = """
import json, os, sys, torch, torch.distributed as dist
from dnnshrink_core.demo.recipe import shard
dist.init_process_group("gloo")
order, batch = shard(torch.randperm(1437, generator=torch.Generator().manual_seed(3)), 64)
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump({"order": order.tolist(), "batch": batch}, f)
dist.destroy_process_group()
"""


def test_the_demo_recipe_gives_every_rank_its_own_share_and_the_same_steps(tmp_path):
    """What the demo's (and a user's copy of it) training needs under torchrun: disjoint
    shares of one shuffled epoch, of equal length, each stepped in half the global batch."""
    script = tmp_path / "shards.py"
    script.write_text(SHARDS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    first, second = (set(r["order"]) for r in ranks)
    assert len(ranks[0]["order"]) == len(ranks[1]["order"]) == 1436 // 2 and not first & second
    assert first | second == set(torch.randperm(1437, generator=torch.Generator().manual_seed(3))[:1436].tolist())
    assert ranks[0]["batch"] == ranks[1]["batch"] == 32


def test_single_process_helpers_are_plain():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.on_main(lambda: 41 + 1) == 42
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model
    with pytest.raises(ValueError):
        distributed.on_main(lambda: int("x"))


def test_resume_under_torchrun(ddp_run, tmp_path):
    first_dir, config, _, _ = ddp_run
    out = tmp_path / "out"
    shutil.copytree(first_dir / "out", out)  # the shared run stays as it was for the other tests
    digests = json.loads((out / "report.json").read_text())["distributed"]["mask_digests"]
    folder = out / "checkpoints"
    uninterrupted = torch.load(folder / "epoch-0005.pt", weights_only=True)["state"]
    for path in [*folder.glob("epoch-000[3-5].pt"), folder / "learned.pt"]:
        path.unlink()  # as if the run had stopped after epoch 2
    calls = tmp_path / "calls"
    calls.mkdir()
    resumed = torchrun("run", config, "--out", out, "--quiet", "--resume", env={**os.environ, "CALLS_DIR": str(calls)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming after epoch 2") == 1
    for rank in (0, 1):  # epochs 3 to 5 only, on both ranks
        assert [c[0] for c in read_calls(calls, rank)].count("train_one_epoch") == 3
    report = json.loads((out / "report.json").read_text())
    assert report["structure_learning"]["epochs"] == 5
    assert report["distributed"]["mask_digests"] == digests  # the same training, the same channels
    resumed_state = torch.load(folder / "epoch-0005.pt", weights_only=True)["state"]
    assert all(torch.equal(resumed_state[k], v) for k, v in uninterrupted.items())  # bit for bit


def test_a_failure_on_rank_0_stops_every_rank(tmp_path):
    config, calls, env = setup_run(tmp_path, max_epochs=1, train_baseline=False, exporters=[])
    run = torchrun("run", config, "--out", tmp_path / "out", "--quiet", env={**env, "BAD_TEST": "1"}, timeout=300)
    assert run.returncode != 0
    message = "test(baseline) returned 'good'; test(model) must return one finite number"
    assert run.stderr.count(message) == 1  # said once, by rank 0
    assert read_calls(calls, 1) == []  # rank 1 never started training on its own


def test_every_rank_stops_when_one_rank_s_loss_diverges(tmp_path):
    config, calls, env = setup_run(tmp_path, max_epochs=3, train_baseline=False, exporters=[])
    run = torchrun("run", config, "--out", tmp_path / "out", "--quiet", env={**env, "INF_ON_RANK1": "1"},
                   timeout=300)
    assert run.returncode != 0
    assert run.stderr.count("structure learning diverged in epoch 1: the loss became NaN or infinite: all 3 "
                            "backward passes gave non-finite gradients") == 1
    assert "[rank0]: Traceback" not in run.stderr and "[rank1]: Traceback" not in run.stderr


def test_torchrun_with_cuda_on_a_machine_without_it_is_refused_before_joining(monkeypatch):
    """Under torchrun ``device: cuda`` where torch sees no GPU reached torch.cuda.set_device
    with a device it refuses (a traceback); it is a DistributedError saying what to give."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distributed.DistributedError, match=r"device 'cuda': torch sees no CUDA device on this machine"):
        distributed.init_from_env("cuda")
    assert not distributed.active()
