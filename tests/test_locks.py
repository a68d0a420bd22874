"""The per-stage-key lock: one holder at a time, waiters name the holder, a killed holder never blocks the next run,
on a local store (flock) and on S3 (moto: exclusive lease generations)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rlhf_tasks.locks import LOCK_PREFIX, lease_alive, owner_info, stage_lock

HOLDER = textwrap.dedent("""
    import sys, time
    from rlhf_tasks.store import ArtifactStore
    from rlhf_tasks.locks import stage_lock
    store = ArtifactStore(sys.argv[1], endpoint_url=sys.argv[2] or None)
    with stage_lock(store, "sft", "k1", done=lambda: False, run="holder", poll_s=0.1) as held:
        print("HELD" if held else "NOT HELD", flush=True)
        time.sleep(300)
""")


def _start_holder(store):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, store.url, store.endpoint_url or ""],
                            stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert proc.stdout.readline().strip() == "HELD"
    return proc


def _acquire_in_thread(store, done=lambda: False):
    """Try the lock in a thread; returns (thread, result dict with the yielded value and the log lines)."""
    out: dict = {"log": []}

    def go():
        with stage_lock(store, "sft", "k1", done=done, log=out["log"].append, run="waiter", poll_s=0.1) as held:
            out["held"] = held

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_killed_holder_never_blocks_the_next_run(kind, request):
    store = request.getfixturevalue("local_store" if kind == "local" else "s3_store")
    holder = _start_holder(store)
    try:
        t, out = _acquire_in_thread(store)
        deadline = time.time() + 30
        while not out["log"] and time.time() < deadline:
            time.sleep(0.05)
        assert t.is_alive() and "held" not in out, "the lock was granted while another process held it"
        assert len(out["log"]) == 1 and "run holder" in out["log"][0] and f"pid {holder.pid}" in out["log"][0]
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        t.join(60)
        assert out.get("held") is True
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_waiter_stops_waiting_when_the_artifact_appears(kind, request):
    store = request.getfixturevalue("local_store" if kind == "local" else "s3_store")
    holder = _start_holder(store)
    committed = threading.Event()
    try:
        t, out = _acquire_in_thread(store, done=committed.is_set)
        time.sleep(0.5)
        assert t.is_alive()
        committed.set()
        t.join(30)
        assert out.get("held") is False
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_released_and_reacquired(local_store):
    for _ in range(2):  # a second round only gets it if the first released it
        with stage_lock(local_store, "sft", "k1", done=lambda: False) as held:
            assert held
            with stage_lock(local_store, "sft", "k1", done=lambda: True, log=lambda _: None) as again:
                assert again is False  # held: even this process cannot take it twice
    assert "_locks" not in local_store.kinds()


def test_s3_lease_from_another_machine_expires_by_heartbeat(s3_store):
    folder = f"{s3_store.root}/{LOCK_PREFIX}/sft-k1"
    other = owner_info("elsewhere") | {"machine": "other-host:boot:ns", "host": "other-host", "pid": 1}
    s3_store.fs.pipe_file(f"{folder}/00000003.json", json.dumps(other).encode())
    seen: list[str] = []
    checks = iter([False, True])
    with stage_lock(s3_store, "sft", "k1", done=lambda: next(checks), log=seen.append, ttl_s=60,
                    poll_s=0.1) as held:
        assert held is False  # fresh heartbeat: alive, so we did not take it
    assert "run elsewhere" in seen[0]
    stale = other | {"heartbeat": time.time() - 61}
    s3_store.fs.pipe_file(f"{folder}/00000003.json", json.dumps(stale).encode())
    with stage_lock(s3_store, "sft", "k1", done=lambda: True, ttl_s=60) as held:
        assert held is True
        names = [p.rsplit("/", 1)[-1] for p in s3_store.fs.ls(folder, detail=False)]
        assert names == ["00000004.json"]  # the next generation, the dead one removed
    with stage_lock(s3_store, "sft", "k1", done=lambda: True, ttl_s=60) as held:
        assert held is True  # released, so free at once
        names = [p.rsplit("/", 1)[-1] for p in s3_store.fs.ls(folder, detail=False)]
        assert names == ["00000005.json"]  # generations are never reused


def test_liveness_tells_a_reused_pid_from_its_writer():
    me = owner_info()
    assert lease_alive(me, ttl_s=1)
    assert not lease_alive(me | {"started": "0"}, ttl_s=1e9)  # same pid, another process start time
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not lease_alive(me | {"pid": proc.pid}, ttl_s=1e9)


def test_only_one_of_many_concurrent_s3_acquirers_wins(s3_store):
    code = textwrap.dedent("""
        import sys, time
        from rlhf_tasks.store import ArtifactStore
        from rlhf_tasks.locks import stage_lock
        store = ArtifactStore(sys.argv[1], endpoint_url=sys.argv[2])
        t0 = float(sys.argv[3])
        time.sleep(max(0.0, t0 - time.time()))
        with stage_lock(store, "sft", "k1", done=lambda: False, poll_s=0.05) as held:
            print("IN", time.time(), flush=True)
            time.sleep(0.5)
            print("OUT", time.time(), flush=True)
    """)
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", code, s3_store.url, s3_store.endpoint_url, str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        lines = dict(line.split() for line in out.splitlines() if line.startswith(("IN ", "OUT ")))
        assert len(lines) == 2, out
        spans.append((float(lines["IN"]), float(lines["OUT"])))
    spans.sort()
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin >= end, f"two holders at once: {spans}"
