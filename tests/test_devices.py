"""rlhf_tasks/devices.py: visible GPUs, how many stage jobs fit, and device leases between threads and processes."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from rlhf_tasks import devices
from rlhf_tasks.config import ExecutionConfig


def test_visible_devices_follow_cuda_visible_devices():
    assert devices.visible_devices({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert devices.visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert devices.visible_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert devices.visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}) == ["GPU-1a2b", "GPU-3c4d"]


@pytest.mark.parametrize("fields, accelerator, gpus, cores, slots", [
    ({}, "cpu", 0, 2, 1),  # a small CPU box stays sequential
    ({}, "cpu", 0, 32, 4),
    ({}, "cuda", 8, 2, 8),  # one job per GPU
    ({"num_procs": 2}, "cuda", 8, 2, 4),  # one job per two GPUs
    ({"num_procs": 4}, "cuda", 2, 2, 1),  # a job needs more GPUs than there are: still one at a time
    ({"num_nodes": 2, "hostfile": "h"}, "cuda", 8, 2, 1),  # each multi-node job takes every node
    ({"work_pool": "gpu"}, "cpu", 0, 2, devices.POOL_SLOTS),
    ({"max_parallel_stages": 3}, "cpu", 0, 2, 3),  # the setting wins
])
def test_stage_slots_fit_the_machine(fields, accelerator, gpus, cores, slots):
    execution = ExecutionConfig(**fields)
    assert devices.stage_slots(execution, accelerator, [str(i) for i in range(gpus)], cpu_count=cores) == slots


def test_leases_in_one_process_never_share_a_device(tmp_path):
    first = devices.try_lease(1, ["0", "1", "2"], tmp_path)
    second = devices.try_lease(2, ["0", "1", "2"], tmp_path)
    assert first.devices == ["0"] and second.devices == ["1", "2"]
    assert devices.try_lease(1, ["0", "1", "2"], tmp_path) is None  # all taken
    first.release()
    with devices.try_lease(1, ["0", "1", "2"], tmp_path) as again:
        assert again.devices == ["0"] and again.cuda_visible_devices == "0"
    assert devices.try_lease(1, ["0", "1", "2"], tmp_path).devices == ["0"]  # the with block released it


def test_a_partial_lease_takes_nothing(tmp_path):
    held = devices.try_lease(1, ["0", "1"], tmp_path)
    assert devices.try_lease(2, ["0", "1"], tmp_path) is None
    assert devices.try_lease(1, ["0", "1"], tmp_path).devices == ["1"]  # device 1 was not left locked
    held.release()


def test_a_waiting_lease_gets_the_device_when_it_is_released(tmp_path):
    held = devices.try_lease(1, ["0"], tmp_path)
    lines, got = [], []
    t = threading.Thread(target=lambda: got.append(devices.lease(1, ["0"], tmp_path, log=lines.append,
                                                                 poll_s=0.05)))
    t.start()
    while not lines:  # it said that it waits
        t.join(0.05)
    assert got == [] and "waiting for 1 of GPUs 0" in lines[0]
    held.release()
    t.join(30)
    assert got[0].devices == ["0"]
    got[0].release()


def test_a_waiting_lease_gives_up_when_the_run_stops(tmp_path):
    held = devices.try_lease(1, ["0"], tmp_path)
    with pytest.raises(KeyboardInterrupt):
        devices.lease(1, ["0"], tmp_path, log=lambda _: None, poll_s=0.01, should_stop=lambda: True)
    with pytest.raises(ValueError, match="2 devices wanted, 1 visible"):
        devices.lease(2, ["0"], tmp_path)
    held.release()


def test_leases_exclude_other_processes_and_die_with_them(tmp_path):
    code = ("import sys; from pathlib import Path; from rlhf_tasks import devices; "
            f"l = devices.try_lease(1, ['0', '1'], Path({str(tmp_path)!r})); print(l.devices[0], flush=True); "
            "sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "0"
        mine = devices.try_lease(1, ["0", "1"], tmp_path)
        assert mine.devices == ["1"] and devices.try_lease(1, ["0", "1"], tmp_path) is None
    finally:
        other.kill()
        other.wait(30)
    assert devices.try_lease(1, ["0", "1"], tmp_path).devices == ["0"]  # the killed holder's lease is gone
    mine.release()


def test_the_launcher_leases_gpus_only_to_accelerated_jobs_on_one_node(tmp_path):
    from rlhf_tasks.launch import _device_lease

    env = {"CUDA_VISIBLE_DEVICES": "3,4", "RLHF_DEVICE_LEASE_DIR": str(tmp_path), "DS_ACCELERATOR": "cuda"}
    cuda = ExecutionConfig(device="cuda")
    with _device_lease(cuda, env, 1, True, print) as first, _device_lease(cuda, env, 1, True, print) as second:
        assert (first.cuda_visible_devices, second.cuda_visible_devices) == ("3", "4")
    with _device_lease(cuda, env, 2, True, print) as both:
        assert both.cuda_visible_devices == "3,4"  # the block above released them
    with _device_lease(cuda, env, 1, False, print) as data_job:  # the data stage needs no GPU
        assert data_job is None
    with _device_lease(cuda, env, 3, True, print) as too_many:  # more processes than GPUs: no lease
        assert too_many is None
    cpu_env = dict(env, DS_ACCELERATOR="cpu")
    with _device_lease(ExecutionConfig(device="auto"), cpu_env, 1, True, print) as cpu_job:
        assert cpu_job is None
    with _device_lease(ExecutionConfig(device="cuda", num_nodes=2, hostfile="h"), env, 1, True, print) as multi:
        assert multi is None  # each node's launcher places its own ranks
