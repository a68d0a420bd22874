"""Slow chaos cases (`make test-chaos`): the real `rlhf run` on the small chaos pipeline (tests/chaos/chaos.yaml),
killed at random points of every training stage, cut off from S3 mid-stage, SIGKILLed mid-upload, run twice at
once, and fed a corrupted artifact. Each result is compared with one uninterrupted reference run."""
from __future__ import annotations

import json
import random
import re
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from chaos_harness import (STEP_RE, TRAINING_STAGES, Run, assert_store_sound, cmdline, copy_artifact,
                           history_steps, leftovers, rlhf, run_args, tagged_processes)
from flaky_proxy import FlakyProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

# How each seed stops each training stage: a signal to the whole `rlhf run` process group (SIGKILL: a preempted
# machine; SIGINT: Ctrl-C; SIGTERM: a scheduler), or "job": SIGKILL to the stage job alone (the run retries it).
KILL_PLANS = {11: ("SIGINT", "SIGKILL", "SIGTERM"), 22: ("SIGTERM", "job", "SIGKILL")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: artifact keys, per-stage step lists and weight hashes to compare against."""
    root = tmp_path_factory.mktemp("reference")
    run = Run(*run_args(root / "store", root / "runs", "--summary-json", str(root / "summary.json")))
    try:
        assert run.finish(900) == 0, run.text
    finally:
        run.kill_all()
    record = json.loads((root / "summary.json").read_text())
    store = root / "store"
    ref = {"store": store, "keys": {s: v["key"] for s, v in record["stages"].items()}}
    ref["steps"] = {s: history_steps(store / s / ref["keys"][s] / "metrics.json") for s in TRAINING_STAGES}
    ref["files"] = {s: _file_hashes(store, s, ref["keys"][s]) for s in record["stages"]}
    assert all(len(v) >= 4 for v in ref["steps"].values()), ref["steps"]
    return ref


def _file_hashes(store: Path, kind: str, key: str) -> dict[str, str]:
    m = json.loads((store / kind / key / "manifest.json").read_text())
    return {f["path"]: f["sha256"] for f in m["files"]}


def _weights(files: dict[str, str]) -> dict[str, str]:
    return {p: h for p, h in files.items() if p.endswith(".safetensors")}


def _wait_step(run: Run, stage: str, at_least: int, timeout: float = 600) -> int:
    """Until the console shows `[stage] step N/...` with N >= at_least (progress lines are throttled); returns N."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = run.wait_for(STEP_RE, timeout=deadline - time.monotonic())
        if m.group(1) == stage and int(m.group(2)) >= at_least:
            return int(m.group(2))
    raise AssertionError(f"{stage} never reached step {at_least}\n{run.text}")


def _stage_job_group(run: Run) -> int:
    """The process group of the stage job now running (its supervisor leads it)."""
    for _ in range(300):
        for pid in tagged_processes(run.tag):
            if "rlhf_tasks.launch --supervise" in cmdline(pid):
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no stage job running\n{run.text}")


def _logs(runs_dir: Path, stage: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(runs_dir.glob(f"*/{stage}/{stage}.log")))


@pytest.mark.parametrize("seed", sorted(KILL_PLANS))
def test_killed_at_random_points_of_every_training_stage_resumes_to_the_same_result(seed, reference, tmp_path):
    rng = random.Random(seed)
    store, runs_dir = tmp_path / "store", tmp_path / "runs"
    copy_artifact(reference["store"], store, "data", reference["keys"]["data"])  # data is no training stage
    args = run_args(store, runs_dir)
    run: Run | None = None
    resumed_expected = []
    try:
        for stage, mode in zip(TRAINING_STAGES, KILL_PLANS[seed]):
            steps = reference["steps"][stage]
            at = rng.randint(steps[0], steps[-2])  # a step inside the stage, never the last
            if run is None:
                run = Run(*args)
                if stage != "sft":  # a fresh run after a kill: the previous run's lock must not block it
                    run.wait_for(rf"^{stage}: running")
            reached = _wait_step(run, stage, at)
            time.sleep(rng.uniform(0.0, 1.5))
            if steps[0] < reached < steps[-1]:  # a checkpoint (every 2 steps) lies behind, the stage is unfinished
                resumed_expected.append(stage)
            if mode == "job":
                import os

                os.killpg(_stage_job_group(run), signal.SIGKILL)
                run.wait_for(rf"^{stage}: attempt 1 failed .*; retrying in")
                continue  # the same run goes on with the retried stage
            run.signal_group(getattr(signal, mode))
            rc = run.finish(120)
            if mode == "SIGKILL":
                assert rc == -signal.SIGKILL
            else:  # Ctrl-C / SIGTERM: a clean stop
                assert rc == 130 and run.err[-1:] == ["interrupted"], run.text
                assert "Traceback" not in run.text and "ConnectError" not in run.text, run.text
            assert leftovers(run) == [], f"{mode} in {stage} at step {reached}"
            assert "waiting for it" not in run.text  # no lock of an earlier killed run blocked this one
            run = None
        if run is None:
            run = Run(*args)
        rc = run.finish(900)
        assert rc == 0, run.text
        assert "waiting for it" not in run.text
        assert leftovers(run) == []
    finally:
        if run is not None:
            run.kill_all()
    assert_store_sound(str(store))
    for stage in TRAINING_STAGES:
        key = reference["keys"][stage]
        assert history_steps(store / stage / key / "metrics.json") == reference["steps"][stage], stage
        # resuming is exact: the same weights, bit for bit, as the uninterrupted run
        assert _weights(_file_hashes(store, stage, key)) == _weights(reference["files"][stage]), stage
    for stage in resumed_expected:
        assert re.search(rf"\[{stage}\] resumed from checkpoint step \d+", _logs(runs_dir, stage)), stage
    for stage in ("sft", "reward", "ppo", "eval"):
        assert (store / stage / reference["keys"][stage] / "manifest.json").exists()
    job_killed = [s for s, m in zip(TRAINING_STAGES, KILL_PLANS[seed]) if m == "job"]
    for stage in job_killed:  # the retry is in the stage log too
        assert "[retry]" in _logs(runs_dir, stage) and f"{stage}: attempt 1 failed" in _logs(runs_dir, stage)


def test_two_identical_runs_at_once_on_one_store(reference, tmp_path):
    """Both finish; the stage lock makes the second wait for the first's artifact instead of writing over it."""
    store, runs_dir = tmp_path / "store", tmp_path / "runs"
    runs = [Run(*run_args(store, runs_dir, "--until", "sft", "--summary-json", str(tmp_path / f"s{i}.json")))
            for i in range(2)]
    try:
        rcs = [r.finish(900) for r in runs]
        assert rcs == [0, 0], "\n\n".join(r.text for r in runs)
        for r in runs:
            assert leftovers(r) == []
    finally:
        for r in runs:
            r.kill_all()
    seen = {u for u in assert_store_sound(str(store)) if "/ckpt-" not in u}
    assert sorted(seen) == sorted(f"{store}/{s}/{reference['keys'][s]}" for s in ("data", "sft")), seen
    assert any("waiting for it" in r.text for r in runs), "neither run waited for the other"
    for stage in ("data", "sft"):
        files = _file_hashes(store, stage, reference["keys"][stage])
        pids = {name.rsplit(".", 2)[-2] for name in files if "tfevents" in name}
        assert len(pids) <= 1, f"{stage} artifact holds TensorBoard files of {len(pids)} processes: {files}"
    assert history_steps(store / "sft" / reference["keys"]["sft"] / "metrics.json") == reference["steps"]["sft"]
    assert _weights(_file_hashes(store, "sft", reference["keys"]["sft"])) == _weights(reference["files"]["sft"])
    records = sorted((store / "_prefect").rglob("*"))
    records = [p for p in records if p.is_file()]
    assert records, "no Prefect cache records"
    for p in records:  # each record parses and holds an artifact URI of this store
        rec = json.loads(p.read_text())
        assert str(store) in json.dumps(rec), p
    assert {json.loads((tmp_path / f"s{i}.json").read_text())["status"] for i in range(2)} == {"completed"}


def test_one_changed_byte_fails_verify_and_the_next_run_recomputes_it(reference, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference["store"], store)  # with the Prefect cache records: they must not win either
    key = reference["keys"]["sft"]
    weights = store / "sft" / key / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    r = rlhf("store", "verify", f"{store}/sft/{key}")
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr, r.stderr
    run = Run(*run_args(store, tmp_path / "runs", "--until", "sft", "--summary-json", str(tmp_path / "s.json")))
    try:
        assert run.finish(900) == 0, run.text
    finally:
        run.kill_all()
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["stages"]["sft"]["status"] == "ran", summary["stages"]
    why = f"{run.text}\n--- sft log ---\n{_logs(tmp_path / 'runs', 'sft')}"
    assert weights.read_bytes() != bytes(raw), f"the corrupted weights are still there\n{why}"
    r = rlhf("store", "verify", f"{store}/sft/{key}")
    assert r.returncode == 0, f"{r.stderr}\n{why}"
    assert history_steps(store / "sft" / key / "metrics.json") == reference["steps"]["sft"]
    assert _weights(_file_hashes(store, "sft", key)) == _weights(reference["files"]["sft"])  # the true weights


# ---- S3 (moto on loopback, behind the tests' own flaky proxy) -------------------------------------------------
@pytest.fixture
def s3(moto_server, s3_bucket, tmp_path):
    """A fresh bucket reached through a FlakyProxy, with a unique secret key the run must never write anywhere."""
    host, port = moto_server.removeprefix("http://").split(":")
    proxy = FlakyProxy(host, int(port))
    secret = f"chaos-secret-{uuid.uuid4().hex}"
    env = {"AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "chaos-key", "AWS_SECRET_ACCESS_KEY": secret}
    yield {"proxy": proxy, "env": env, "secret": secret, "url": f"{s3_bucket}/chaos", "bucket": s3_bucket,
           "moto": moto_server}
    proxy.close()


def _bucket_objects(s3) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["moto"])
    bucket = s3["bucket"].removeprefix("s3://")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def test_sigkill_mid_upload_on_s3_then_resume_and_the_secret_is_nowhere(reference, s3, tmp_path):
    import os

    runs_dir = tmp_path / "runs"
    key = reference["keys"]["sft"]
    fired = threading.Event()
    holder: dict = {}

    def kill_on_final_upload(method: str, path: str) -> None:
        # the first PUT into the final sft artifact (not a checkpoint): the manifest, written last, never follows
        if method == "PUT" and f"/sft/{key}/" in path and not fired.is_set():
            fired.set()
            holder["run"].signal_group(signal.SIGKILL)

    s3["proxy"].on_request = kill_on_final_upload
    first = holder["run"] = Run(*run_args(s3["url"], runs_dir, "--until", "sft"), env=s3["env"])
    try:
        assert first.finish(900) == -signal.SIGKILL, first.text
        assert fired.is_set()
        assert leftovers(first) == []
    finally:
        first.kill_all()
    s3["proxy"].on_request = None
    seen = assert_store_sound(s3["url"], env=s3["env"])
    assert seen.get(f"{s3['url']}/sft/{key}") in (None, ("INCOMPLETE", 2)), seen
    summary = tmp_path / "summary.json"
    second = Run(*run_args(s3["url"], runs_dir, "--until", "sft", "--summary-json", str(summary)), env=s3["env"])
    try:
        assert second.finish(900) == 0, second.text
        assert leftovers(second) == []
    finally:
        second.kill_all()
    assert json.loads(summary.read_text())["stages"]["sft"]["status"] == "ran"
    assert assert_store_sound(s3["url"], env=s3["env"])[f"{s3['url']}/sft/{key}"] == ("ok", 0)
    assert re.search(r"\[sft\] resumed from checkpoint step \d+", _logs(runs_dir, "sft"))
    # The secret: in no console line, log, spec, run record, manifest, cache record, Prefect artifact (the
    # temporary API's database) or summary.
    secret = s3["secret"].encode()
    objects = _bucket_objects(s3)
    assert any(k.endswith("manifest.json") for k in objects) and any("/_prefect/" in k for k in objects)
    assert any("/runs/" in k for k in objects)
    manifest = json.loads(objects[f"chaos/sft/{key}/manifest.json"])
    assert _weights({f["path"]: f["sha256"] for f in manifest["files"]}) == _weights(reference["files"]["sft"])
    places = {f"s3://{k}": v for k, v in objects.items()}
    prefect_home = Path(os.environ["PREFECT_HOME"])
    assert list(prefect_home.glob("*.db")), "no Prefect database to search"
    for root in (runs_dir, prefect_home):
        places |= {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    places["summary"] = summary.read_bytes()
    places["console"] = (first.text + second.text).encode()
    assert [where for where, data in places.items() if secret in data] == []


def test_s3_unreachable_for_10_s_in_the_middle_of_a_stage(reference, s3, tmp_path):
    """Uploads retry and complete, or the stage fails cleanly and the next run completes; nothing half-made
    verifies."""
    runs_dir = tmp_path / "runs"
    run = Run(*run_args(s3["url"], runs_dir, "--until", "sft"), env=s3["env"])
    outcomes = []
    try:
        _wait_step(run, "sft", reference["steps"]["sft"][1])
        cut = threading.Thread(target=s3["proxy"].outage, args=(10.0,))
        cut.start()
        cut.join()
        after_outage = len(s3["proxy"].requests)
        rc = run.finish(900)
        outcomes.append(rc)
        if rc != 0:
            assert rc == 1, run.text
            assert len([x for x in run.err if x.startswith("error:")]) == 1 and "Traceback" not in run.text, run.text
            assert leftovers(run) == []
            assert_store_sound(s3["url"], env=s3["env"])
            run = Run(*run_args(s3["url"], runs_dir, "--until", "sft"), env=s3["env"])
            outcomes.append(run.finish(900))
        assert outcomes[-1] == 0, run.text
        assert leftovers(run) == []
    finally:
        run.kill_all()
    assert len(s3["proxy"].requests) > after_outage  # the stage's uploads went on after it
    print(f"S3 outage: {s3['proxy'].cut} open connections cut; exit codes of the runs: {outcomes}")
    seen = assert_store_sound(s3["url"], env=s3["env"])
    assert seen[f"{s3['url']}/sft/{reference['keys']['sft']}"] == ("ok", 0)
    sft_dir = rlhf("store", "get", f"{s3['url']}/sft/{reference['keys']['sft']}", env=s3["env"])
    assert sft_dir.returncode == 0, sft_dir.stderr
    local = Path(sft_dir.stdout.strip())
    assert history_steps(local / "metrics.json") == reference["steps"]["sft"]
    got = {f["path"]: f["sha256"] for f in json.loads((local / "manifest.json").read_text())["files"]}
    assert _weights(got) == _weights(reference["files"]["sft"])
