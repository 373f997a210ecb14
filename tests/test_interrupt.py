"""Ctrl-C (SIGINT) in the middle of a real `dnnshrink run` leaves a resumable state."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from dnnshrink_core.checkpoint import Checkpoints

FUNCTIONS = '''
import os, signal, time
import torch
from torch import nn

X = torch.randn(4, 3, 8, 8)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.a(x).mean((2, 3)))

def build():
    torch.manual_seed(0)
    return Net()

def train_one_epoch(model, lr):
    with open(os.environ["EPOCH_LOG"], "a") as f:  # with how SIGINT stands, should the test fail
        f.write(f"epoch {signal.getsignal(signal.SIGINT)} {signal.pthread_sigmask(signal.SIG_BLOCK, [])}\\n")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()
    time.sleep(0.5)  # long enough for the test to interrupt between epochs and within one

def train(model):
    pass

def test(model):
    return 0.5
'''


@pytest.mark.heavy
def test_sigint_then_resume(tmp_path):
    (tmp_path / "funcs.py").write_text(FUNCTIONS)
    (tmp_path / "config.yaml").write_text(
        "model: funcs.py:build\nfunctions: funcs.py\ninput_shape: [1, 3, 8, 8]\ndevice: cpu\n"
        "max_epochs: 10\nstrength_scale: 1e-6\nexporters: [pytorch]\n")
    out, log = tmp_path / "out", tmp_path / "epochs.log"
    env = {**os.environ, "EPOCH_LOG": str(log)}
    command = ["dnnshrink", "run", str(tmp_path / "config.yaml"), "--out", str(out), "--quiet"]
    # a shell starts a background job (`pytest &`) with SIGINT ignored, which its children
    # inherit and Python keeps: the run is started as a terminal would start it, Ctrl-C live
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "epoch-0002.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before epoch 2"
        time.sleep(0.05)
    time.sleep(0.25)  # inside epoch 3, most likely
    running = process.poll() is None
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    epochs = log.read_text() if log.exists() else ""
    assert process.returncode == 130, (f"running when signalled: {running}; epochs run (SIGINT handler, "
                                       f"blocked signals):\n{epochs}\n"
                                       f"{stderr[-1500:]}\n{stdout[-1500:]}")
    assert "dnnshrink: interrupted" in stderr and "Traceback" not in stderr
    match = re.search(r"The last checkpoint is (\S+epoch-(\d{4})\.pt); continue with `dnnshrink run CONFIG --resume`",
                      stdout)
    assert match, stdout[-2000:]
    done = int(match.group(2))
    assert 2 <= done < 10
    # every checkpoint is whole and no temporary file is left behind
    folder = out / "checkpoints"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    store = Checkpoints(folder)
    for path in sorted(folder.glob("epoch-*.pt")):
        assert set(store.load(path)["state"]) == set(torch.nn.Module.state_dict(_net(tmp_path)))
    assert not (out / "report.json").exists()

    log.write_text("")
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {done}" in resumed.stdout
    assert len(log.read_text().splitlines()) == 10 - done  # only the epochs that were missing
    report = json.loads((out / "report.json").read_text())
    assert report["structure_learning"]["epochs"] == 10


def _net(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("interrupt_funcs", tmp_path / "funcs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()
