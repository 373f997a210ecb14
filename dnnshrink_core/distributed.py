"""Runs under ``torchrun`` (torch.distributed): every rank trains, rank 0 writes.

``torchrun --nproc_per_node=N -m dnnshrink_core run CONFIG`` starts N processes; each one
calls :func:`init_from_env`, which joins the process group (gloo on the CPU, NCCL on CUDA,
one GPU per local rank). The user's training functions then get the model wrapped in
``DistributedDataParallel`` on every rank, so gradients (the regularizer's included) are
averaged and the BatchNorm scales — hence the masks — stay identical everywhere; the
pipeline checks that they do. Steps that only one process should do (testing, generating,
exporting, writing files) run on rank 0 through :func:`on_main`, which hands the result,
or the error, to every rank so that no process is left waiting.
"""
from __future__ import annotations

import gc
import hashlib
import os
import pickle
from datetime import timedelta
from typing import Any, Callable, List, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import DnnshrinkError

T = TypeVar("T")


class DistributedError(DnnshrinkError):
    """The ranks of a distributed run disagree, or the process group cannot be joined."""


class RankFailed(DnnshrinkError):
    """Raised on the other ranks when a step that rank 0 ran failed there."""


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, and in a plain single-process run."""
    return rank() == 0


def local_device(requested: Optional[str]) -> Optional[str]:
    """The device this rank should use: under torchrun, a bare ``cuda`` (or no choice, when
    CUDA is there) becomes ``cuda:LOCAL_RANK``; anything else is left as it is."""
    if not launched():
        return requested
    if requested is not None and requested.startswith("cuda:"):
        raise DistributedError(f"device {requested!r} would put every rank on the same GPU; under torchrun give "
                               "`cuda` (each rank takes the GPU of its LOCAL_RANK; choose the GPUs with "
                               "CUDA_VISIBLE_DEVICES) or `cpu`")
    wants_cuda = requested in (None, "cuda") and torch.cuda.is_available()
    if not wants_cuda:
        return requested
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise DistributedError(f"local rank {local} has no GPU of its own: this machine shows "
                               f"{torch.cuda.device_count()} GPU(s). Start at most that many processes per node "
                               "(--nproc_per_node), or run on the CPU with device: cpu")
    return f"cuda:{local}"


def init_from_env(device: Optional[str] = None, timeout_s: Optional[float] = None) -> bool:
    """Join the process group torchrun describes in the environment; returns True when this
    call initialized it (the caller then owns it and should :func:`shutdown` it).

    Does nothing outside torchrun or when the group already exists (a program that set up
    torch.distributed itself keeps its own group and backend). ``timeout_s`` bounds every
    wait of one rank for another, rank 0's testing and exporting included (default
    ``DNNSHRINK_DIST_TIMEOUT`` seconds, else 1800).
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("DNNSHRINK_DIST_TIMEOUT", "1800"))
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; run with one process")
    device = local_device(device)
    backend = "nccl" if device is not None and device.startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r}: torch sees no CUDA device on this machine; give device: cpu "
                                   "(the ranks then talk over gloo)")
        torch.cuda.set_device(torch.device(device))
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # the message of torch's rendezvous errors is the useful part
        raise DistributedError(f"cannot join the process group ({backend}): {exc}. Start the run with "
                               "`torchrun --nproc_per_node=N -m dnnshrink_core run CONFIG`.") from exc
    return True


def shutdown(barrier: bool = True) -> None:
    """Leave the process group; with ``barrier`` first wait for every rank, so that none exits
    while another still talks (skip it on the way out of an error: a failed rank may never come)."""
    if barrier and active():
        dist.barrier()
    if dist.is_available() and dist.is_initialized():
        # the run's objects caught in reference cycles (a DistributedDataParallel wrapper and
        # its reducer, which holds the group's work) go now, while the group and the
        # interpreter are whole, not at interpreter teardown, where a C++ thread still joinable
        # aborts the process after the run has finished ("terminate called without an active
        # exception", seen on rank 0 about once in ten two-rank runs)
        gc.collect()
        dist.destroy_process_group()


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (pickled through the process group, which
    only our own processes share)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(step: Callable[[], T], share: bool = True) -> Optional[T]:
    """Run ``step`` on rank 0 only and give its result to every rank (``share=False``: only
    whether it succeeded; the other ranks get None).

    When it fails on rank 0 (or its result cannot be sent), the error is raised there as it
    is, and on the other ranks as :class:`RankFailed` with its message, so that every
    process stops instead of waiting. Ctrl-C is not forwarded: every rank receives it.
    """
    if not active():
        return step()
    payload: Any = None
    error: Optional[BaseException] = None
    result: Any = None
    if is_main():
        try:
            result = step()
            payload = pickle.dumps(("ok", result if share else None))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the other ranks must hear of it, or they wait forever
            error = exc
            payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
    payload = broadcast(payload)
    if error is not None:
        raise error
    status, value = pickle.loads(payload)
    if status == "error":
        raise RankFailed(f"rank 0 failed, so rank {rank()} stops too: {value}")
    return result if is_main() else value


def wrap(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed (its parameters and buffers are
    copied from rank 0 now), else ``model`` itself. ``find_unused_parameters`` is DDP's
    option for models whose forward leaves some parameters out (auxiliary heads, branches)."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def digest(array: np.ndarray) -> str:
    """A short SHA-256 of an array's values (to compare masks across ranks)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def gather_digests(array: np.ndarray) -> List[str]:
    """Every rank's :func:`digest` of its ``array``, in rank order; raises when they differ."""
    mine = digest(array)
    if not active():
        return [mine]
    everyone: List[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        raise DistributedError(
            "the ranks chose different channels (" + ", ".join(f"rank {r}: {d}" for r, d in enumerate(everyone))
            + "). train_one_epoch must train the model it is given (dnnshrink wraps it in DistributedDataParallel "
            "so that every rank keeps the same BatchNorm scales); do not replace or re-wrap it.")
    return everyone
