"""Device, precision, distributed and seeding helpers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from msta.method.runtime import (
    DistributedContext,
    autocast,
    barrier,
    init_distributed,
    resolve_device,
    seed_everything,
    set_deterministic,
)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_autocast_is_a_no_op_on_cpu_and_for_fp32() -> None:
    with autocast(torch.device("cpu"), "bf16"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), "fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_bf16_on_cuda() -> None:
    with autocast(torch.device("cuda"), "bf16"):
        out = torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")
    assert out.dtype == torch.bfloat16


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed() == (0, 1, 0)
    assert not torch.distributed.is_initialized()
    barrier()  # a no-op without a group


def test_distributed_context_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = DistributedContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_distributed) == (3, 4, 1, True)


@pytest.mark.slow
def test_two_process_gloo_group() -> None:
    """init_distributed joins a real group when launched like torchrun (two CPU processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "from msta.method.runtime import *\n"
        "rank, world, local = init_distributed()\n"
        "import torch.distributed as dist\n"
        "barrier()\n"
        "print(rank, world, local, dist.get_world_size(), dist.get_rank() == 0)\n"
        "dist.destroy_process_group()\n"
    )
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [["0", "2", "0", "2", "True"], ["1", "2", "1", "2", "False"]]


def test_seed_everything_repeats_random_streams() -> None:
    seed_everything(2048)
    a = torch.randn(3)
    seed_everything(2048)
    assert torch.equal(a, torch.randn(3))


def test_set_deterministic_toggles_torch() -> None:
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
