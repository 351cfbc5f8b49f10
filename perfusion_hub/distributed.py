"""Data-parallel training over N processes (`pfx train --devices N`).

Every process loads the base on its own device, draws the same sampling plan and noise from the seed,
trains on its share of each step's batch, and sums gradients (and the i* statistics) with one flat
all-reduce per step; so N processes compute what one process computes, up to summation order. NCCL on
CUDA devices; gloo on CPU (used by the tests, and for trying the code path without GPUs). Process 0
writes the concept file and returns a summary.
"""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, base_value: str, load_kwargs: dict, cov_bytes: bytes,
            train_kwargs: dict, summary_path: str) -> None:
    import torch
    import torch.distributed as dist

    from perfusion_hub.bases import load_base
    from perfusion_hub.covariance import Covariance
    from perfusion_hub.train import train_concept

    cuda = load_kwargs.get("device") == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        base = load_base(base_value, **dict(load_kwargs, device=device))
        res = train_concept(base, covariance=Covariance.from_bytes(cov_bytes), **train_kwargs)
        if rank == 0:
            Path(summary_path).write_text(json.dumps({
                "path": str(res.path), "previews": [str(p) for p in res.previews], "losses": res.losses,
                "seconds": res.seconds, "warnings": res.warnings,
            }))
    finally:
        dist.destroy_process_group()


def train_data_parallel(devices: int, base_value: str, *, covariance, load_kwargs: dict | None = None,
                        **train_kwargs) -> dict:
    """Run train_concept on `devices` processes; returns process 0's summary (path, previews, losses...).

    load_kwargs: arguments of load_base; device "cuda" puts process i on cuda:i, anything else on CPU.
    train_kwargs: arguments of train_concept except base, covariance and progress (which cannot cross
    processes).
    """
    import torch
    import torch.multiprocessing as mp

    from perfusion_hub.errors import BadInput

    load_kwargs = dict(load_kwargs or {})
    if load_kwargs.get("device") == "cuda" and torch.cuda.device_count() < devices:
        raise BadInput(f"--devices {devices} needs {devices} CUDA devices; this machine has "
                       f"{torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        mp.start_processes(_worker, args=(devices, _free_port(), base_value, load_kwargs, covariance.to_bytes(),
                                          train_kwargs, str(summary)), nprocs=devices, join=True,
                           start_method="spawn")
        return json.loads(summary.read_text())
