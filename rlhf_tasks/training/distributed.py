"""Distributed setup: the process group (alone or under a launcher), rank/world, device, collectives, seeding."""
from __future__ import annotations

import contextlib
import os
import random
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch

from ..launch import free_port
from .private_internals import install_single_process_collectives


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed and return (rank, world_size).

    Works under torchrun / the deepspeed launcher (rendezvous variables set) and alone: a lone process gets
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 and a free MASTER_PORT (without them DeepSpeed tries
    MPI discovery and fails). Backend: gloo on CPU, the accelerator's (nccl) otherwise. Idempotent."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.distributed.is_initialized():
        from .op_builds import COMM_OPS, announce_pending_builds

        announce_pending_builds(COMM_OPS)  # DeepSpeed's comm backend compiles its CPU op on first use: say so
        backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())
    elif torch.distributed.get_world_size() == 1:
        install_single_process_collectives()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def device() -> torch.device:
    """The accelerator device of this process (DeepSpeed's choice: `DS_ACCELERATOR`, else auto-detected)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())


def torch_dtype(precision: str) -> torch.dtype:
    """fp32 / bf16 / fp16 -> torch dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor) -> list[float]:
    """Sum a short vector of floats over all ranks (float64 on CPU, gloo-safe)."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if rank_world()[1] > 1:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            t = t.to(device())
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def destroy_distributed() -> None:
    """Tear the process group down (a clean exit; avoids an abort at interpreter exit seen with ZeRO-3)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.barrier()
        try:  # DeepSpeed's variant also drops its cached groups, so a later init in this process works
            import deepspeed.comm as ds_comm

            ds_comm.destroy_process_group()
        except Exception:  # pragma: no cover - DeepSpeed never initialised its comm backend
            torch.distributed.destroy_process_group()


def local_first(fn: Callable[[], Any]) -> Any:
    """Run `fn` on local rank 0 first (downloads, builds into a shared cache), then on the other ranks."""
    if local_rank() == 0:
        out = fn()
        barrier()
        return out
    barrier()
    return fn()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank_streams(seed: int) -> None:
    """Seed this rank's own random streams (dropout, sampling) at the start of a run: distinct per rank, the same
    on every run. A resumed run restores the checkpoint's RNG states instead."""
    seed_everything(seed + 7919 * rank_world()[0])


def configure_threads() -> None:
    """One process per rank shares the CPU cores: split them (unless OMP_NUM_THREADS says otherwise)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    world_local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_local)))
