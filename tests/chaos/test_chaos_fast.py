"""Fast chaos cases (also in `make test`): the real `rlhf run` stopped, starved of disk, or run twice at once, during
its data stage. What must hold: no process left behind, "interrupted" and exit 130 on SIGTERM, one `error:` line and
no half-written file on a full disk, and two stores never mixed up by runs of one config."""
import json
import signal
import subprocess
from pathlib import Path

import pytest

from chaos_harness import Run, assert_store_sound, cmdline, leftovers, run_args, tagged_processes

pytestmark = pytest.mark.chaos


def _wait_for_job(run: Run, stage: str = "data") -> None:
    """Until the stage's job process runs (the temporary Prefect API is up by then)."""
    run.wait_for(rf"^{stage}: running")
    for _ in range(600):
        if any("rlhf_tasks.stage_main" in cmdline(p) for p in tagged_processes(run.tag)):
            return
        if run.proc.poll() is not None:
            break
        import time

        time.sleep(0.1)
    raise AssertionError(f"no {stage} job appeared\n{run.text}")


def test_killing_only_the_cli_leaves_no_process_behind(tmp_path):
    """SIGKILL to the `rlhf` process alone: its job (own session, supervised) and the temporary Prefect API (own
    session) must notice and go, instead of living on under pid 1."""
    run = Run(*run_args(tmp_path / "store", tmp_path / "runs", "--until", "data"))
    try:
        _wait_for_job(run)
        procs = {p: cmdline(p) for p in tagged_processes(run.tag)}
        assert any("flows.ephemeral --serve" in c for c in procs.values()), procs  # the API is ours, running
        run.proc.send_signal(signal.SIGKILL)
        run.wait(30)
        assert leftovers(run) == []
    finally:
        run.kill_all()


def test_sigterm_to_the_group_says_interrupted_and_exits_130(tmp_path):
    run = Run(*run_args(tmp_path / "store", tmp_path / "runs", "--until", "data"))
    try:
        _wait_for_job(run)
        run.signal_group(signal.SIGTERM)
        rc = run.finish(60)
        assert rc == 130, run.text
        assert run.err[-1:] == ["interrupted"], run.text
        assert "Traceback" not in run.text and "ConnectError" not in run.text, run.text
        assert leftovers(run) == []
    finally:
        run.kill_all()


@pytest.fixture
def full_disk(tmp_path):
    """A real, full filesystem: a 1 MiB tmpfs filled to the last byte (needs permission to mount)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        (mnt / "store").mkdir()
        with open(mnt / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == 28
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_ends_in_one_error_line_and_no_half_written_file(tmp_path, full_disk):
    store = full_disk / "store"
    run = Run(*run_args(store, tmp_path / "runs", "--until", "data", "--set", "execution.retries=0"))
    try:
        rc = run.finish(300)
        assert rc == 1, run.text
        errors = [line for line in run.err if line.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], run.text
        assert "Traceback" not in "\n".join(run.out + run.err), run.text
        half = [str(p) for p in store.rglob("*") if ".tmp-" in p.name]
        half += [str(p) for p in (store / "runs").rglob("*") if p.stat().st_size == 0]
        assert half == [], half
        assert_store_sound(str(store))  # what the job managed to upload before the disk filled never verifies
        assert leftovers(run) == []
    finally:
        run.kill_all()


def test_one_config_on_two_stores_at_once_stays_apart(tmp_path):
    """Same config, same runs folder (the default ./rlhf-runs of one working directory), two stores, started
    together: each store gets its own artifact and run record, each job read its own spec."""
    stores = [tmp_path / "store-a", tmp_path / "store-b"]
    runs = [Run(*run_args(s, tmp_path / "runs", "--until", "data", "--summary-json", str(s) + ".json"))
            for s in stores]
    try:
        rcs = [r.finish(600) for r in runs]
        assert rcs == [0, 0], "\n\n".join(r.text for r in runs)
        for s in stores:
            assert_store_sound(str(s))
            summary = json.loads(Path(str(s) + ".json").read_text())
            assert summary["store"] == str(s)
            assert summary["stages"]["data"]["uri"].startswith(str(s) + "/")
            assert [p.name for p in (s / "data").iterdir()] == [summary["stages"]["data"]["key"]]
            assert len(list((s / "runs").glob("*.json"))) == 1
        specs = sorted((tmp_path / "runs").glob("*/data/spec.json"))
        assert len(specs) == 2  # one scratch folder per run
        assert sorted(json.loads(p.read_text())["store"]["url"] for p in specs) == sorted(map(str, stores))
        for r in runs:
            assert leftovers(r) == []
    finally:
        for r in runs:
            r.kill_all()
