"""The accelerators of this node: which are visible, how many stage jobs fit at once, and device leases.

A lease gives one stage job devices of its own while other jobs run beside it (parallel stages of a run, or several
flow runs on one worker): an exclusive `flock` on `<lease dir>/device-<id>.lock` per device, held by the process
that launched the job for as long as the job runs. Threads of one process and separate processes exclude each
other alike (a flock belongs to the open file), and the kernel drops the lock when its holder dies, so a crashed
run never leaves a device taken. The job sees only its devices (`CUDA_VISIBLE_DEVICES`).

Keep the imports light: the launcher imports this module.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

CPU_CORES_PER_STAGE = 8  # a CPU stage job keeps this many cores busy: a smaller box runs one job at a time
POOL_SLOTS = 4  # with a work pool the jobs run elsewhere; the pool's own limits queue what does not fit
LEASE_POLL_S = 1.0


def visible_devices(env: dict | None = None) -> list[str]:
    """The GPU ids a job started from here may use: `CUDA_VISIBLE_DEVICES` when it is set (its entries as given,
    "" or "-1" meaning none), else one id per GPU `nvidia-smi -L` lists (or per /dev/nvidiaN), else none."""
    env = os.environ if env is None else env
    given = env.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        ids = [d.strip() for d in given.split(",") if d.strip()]
        return [] if ids[:1] == ["-1"] else ids
    count = 0
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            count = 0
    if count == 0:
        count = sum(1 for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))
    return [str(i) for i in range(count)]


def stage_slots(execution, accelerator: str, devices: list[str], cpu_count: int | None = None) -> int:
    """How many stage jobs may run at once: `execution.max_parallel_stages` when set, else what fits the machine:
    `POOL_SLOTS` with a work pool, one job per `num_procs` GPUs on one GPU node, one per `CPU_CORES_PER_STAGE`
    cores on a CPU box (so 1 on a small one), 1 for multi-node jobs (each takes every node)."""
    if execution.max_parallel_stages is not None:
        return execution.max_parallel_stages
    if execution.work_pool:
        return POOL_SLOTS
    if execution.num_nodes > 1:
        return 1
    if accelerator != "cpu":
        return max(1, len(devices) // execution.num_procs)
    return max(1, (cpu_count or os.cpu_count() or 1) // CPU_CORES_PER_STAGE)


def lease_dir(env: dict | None = None) -> Path:
    """Where the lease files live: RLHF_DEVICE_LEASE_DIR, else one folder per user in the temp dir (one node)."""
    env = os.environ if env is None else env
    return Path(env.get("RLHF_DEVICE_LEASE_DIR") or Path(tempfile.gettempdir()) / f"rlhf-device-leases-{os.getuid()}")


class DeviceLease:
    """Devices held by this process until `release()` (or the end of a `with` block)."""

    def __init__(self, devices: list[str], fds: list[int]):
        self.devices, self._fds = devices, fds

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.devices)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the file drops its flock
        self._fds = []

    def __enter__(self) -> "DeviceLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_lease(count: int, devices: list[str], folder: Path) -> DeviceLease | None:
    """`count` of `devices` that no other lease holds, taken now (first free first), or None when fewer are free."""
    folder.mkdir(parents=True, exist_ok=True)
    held: list[tuple[str, int]] = []
    for device in devices:
        if len(held) == count:
            break
        fd = os.open(folder / f"device-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock", os.O_RDWR | os.O_CREAT,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((device, fd))
    if len(held) < count:
        for _, fd in held:
            os.close(fd)
        return None
    return DeviceLease([d for d, _ in held], [fd for _, fd in held])


def lease(count: int, devices: list[str], folder: Path, log: Callable[[str], None] = print,
          poll_s: float = LEASE_POLL_S, should_stop: Callable[[], bool] = lambda: False) -> DeviceLease:
    """Wait until `count` of `devices` are free and take them (one line logged while waiting). `should_stop()`
    is asked between polls: a run being stopped raises KeyboardInterrupt instead of waiting on."""
    if count > len(devices):
        raise ValueError(f"{count} devices wanted, {len(devices)} visible ({','.join(devices) or 'none'})")
    said = False
    while True:
        got = try_lease(count, devices, folder)
        if got is not None:
            return got
        if should_stop():
            raise KeyboardInterrupt("stopped while waiting for a device lease")
        if not said:
            log(f"[devices] waiting for {count} of GPUs {','.join(devices)} (held by other stage jobs)")
            said = True
        time.sleep(poll_s)
