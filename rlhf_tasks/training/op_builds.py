"""DeepSpeed's compiled ops: say so before one is JIT-compiled (minutes, once per machine), and build them ahead.

On first use DeepSpeed compiles an op with ninja into TORCH_EXTENSIONS_DIR: on the CPU accelerator its shared-memory
collectives (`deepspeed_shm_comm`, at every process group start), and DeepSpeed's Adam (`cpu_adam`, or
`fused_adam` on CUDA) with `optim.optimizer: deepspeed_adam` or ZeRO offload. A job that does that prints a
`[build] ...` line first (flows/observe.py turns it into a console line and the stage's progress artifact), so a
worker's first stage does not look hung. `python -m rlhf_tasks.training.op_builds` compiles them ahead (`make
setup`, infra/Dockerfile).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

BUILD_PREFIX = "[build] "
# A build lock older than this was left by a killed process: a live holder keeps it for one compile (minutes).
STALE_LOCK_S = 30 * 60  # the line a job prints before a compile (parsed by flows/observe.py)
COMM_OPS = ("ShareMemCommBuilder",)  # built when the process group starts (DeepSpeed's TorchBackend)
ADAM_OPS = ("CPUAdamBuilder", "FusedAdamBuilder")  # DeepSpeed's Adam on CPU / on an accelerator


def _builders(class_names):
    """The accelerator's builders for `class_names` that it has and that can compile here."""
    from deepspeed.accelerator import get_accelerator

    out = []
    for name in class_names:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible(verbose=False):
            out.append(builder)
    return out


def adam_ops(offload: bool) -> tuple[str, ...]:
    """The Adam op builder `deepspeed_adam` (or ZeRO offload) loads on this accelerator: CPU Adam when the
    optimizer state lives on the CPU (the CPU accelerator, or offload), else the fused one."""
    from deepspeed.accelerator import get_accelerator

    return ADAM_OPS[:1] if offload or get_accelerator().device_name() == "cpu" else ADAM_OPS[1:]


def announce_pending_builds(class_names, print_line=print) -> list[str]:
    """Print one `[build]` line for each op of `class_names` that loading would compile now (local rank 0 only:
    the other ranks wait for the same build). Returns the op names announced."""
    from .private_internals import op_build_pending  # torch and DeepSpeed: only in the job, not in the flow

    builders = _builders(class_names)
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0"
    for b in builders if rank0 else ():
        clear_stale_build_lock(b, print_line=print_line)
    pending = [(b.name, op_build_pending(b)) for b in builders]
    pending = [(n, f) for n, f in pending if f is not None]
    if not rank0:
        return [n for n, _ in pending]
    for name, folder in pending:
        print_line(f"{BUILD_PREFIX}compiling DeepSpeed op {name} (once per machine, a few minutes on a small CPU; "
                   f"kept in {os.path.dirname(folder) if folder != '?' else 'TORCH_EXTENSIONS_DIR'})")
        sys.stdout.flush()
    return [n for n, _ in pending]


def setup_ops(with_adam: bool) -> tuple[str, ...]:
    """The ops to build ahead: the collectives every job loads, and with `with_adam` the Adam ops this accelerator
    can run (on CPU only CPU Adam: DeepSpeed's CPU FusedAdam is never what `deepspeed_adam` picks here)."""
    if not with_adam:
        return COMM_OPS
    from deepspeed.accelerator import get_accelerator

    return COMM_OPS + (ADAM_OPS if get_accelerator().device_name() != "cpu" else ADAM_OPS[:1])


def clear_stale_build_lock(builder, max_age_s: float = STALE_LOCK_S, print_line=print) -> bool:
    """Remove the op's build lock (private_internals.op_build_lock) when it is older than `max_age_s`, saying so:
    a job killed while compiling (or while torch checked the compiled module) would otherwise make every later
    job on this machine wait on it forever, silently. Returns whether a lock was removed."""
    from .private_internals import op_build_lock

    lock = op_build_lock(builder)
    try:
        age = time.time() - os.stat(lock).st_mtime if lock else None
    except FileNotFoundError:
        return False
    if age is None or age < max_age_s:
        return False
    with contextlib.suppress(FileNotFoundError):  # another job may have cleared it first
        os.remove(lock)
    print_line(f"{BUILD_PREFIX}removed a stale build lock of DeepSpeed op {builder.name} ({lock}, {age / 60:.0f} min "
               f"old: left by a killed build)")
    return True


def prebuild(class_names=COMM_OPS, print_line=print) -> list[str]:
    """Compile (or load, when already compiled) every op of `class_names` this accelerator has; returns their
    names. A failing compile raises: a broken toolchain should stop `make setup`, not the first stage."""
    built = []
    for builder in _builders(class_names):
        t0 = time.monotonic()
        announce_pending_builds([type(builder).__name__], print_line)
        builder.load(verbose=False)
        print_line(f"DeepSpeed op {builder.name} ready ({time.monotonic() - t0:.0f} s)")
        built.append(builder.name)
    return built


if __name__ == "__main__":
    # `make setup`: the collectives only (every stage job loads them; ~1.5 min). `--with-adam` adds the Adam op that
    # only `optim.optimizer: deepspeed_adam` and ZeRO offload load (minutes more: the worker image builds it).
    prebuild(setup_ops(with_adam="--with-adam" in sys.argv[1:]))
