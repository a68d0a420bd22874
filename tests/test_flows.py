"""The pipeline flow's mechanics with stand-in stage jobs (tests/flow_fake_stages.py): Prefect caching keyed by the
stage key with records in the store, the store as the source of truth, retries that resume, `rlhf plan` and
`rlhf run` (table, summary JSON, exit codes). One Prefect test harness per module (~13 s), ~1-2 s per flow run."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_tasks import stages
from rlhf_tasks.cli import main
from rlhf_tasks.config import load_config

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a busy 2-core box needs minutes
        yield


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    """A sitecustomize that registers the fake stages in every Python subprocess (the stage jobs)."""
    d = tmp_path_factory.mktemp("site")
    (d / "sitecustomize.py").write_text("import flow_fake_stages\nflow_fake_stages.install()\n")
    return d


@pytest.fixture
def fakes(monkeypatch, tmp_path, site_dir):
    """Fake stages here and in the jobs; returns a helper that reads which stages were launched."""
    for name, d in list(stages.STAGE_DEFS.items()):
        monkeypatch.setitem(stages.STAGE_DEFS, name, dataclasses.replace(
            d, module="flow_fake_stages", distributed=False))
    monkeypatch.setattr(stages, "data_source_fingerprints", lambda cfg: [{"path": s.path} for s in cfg.data.sources])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site_dir), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    events = tmp_path / "events.txt"
    monkeypatch.setenv("FAKE_EVENTS", str(events))
    for var in ("FAKE_CRASH_STAGE", "FAKE_FAIL_STAGE"):
        monkeypatch.delenv(var, raising=False)

    def launched() -> list[str]:
        lines = events.read_text().split("\n") if events.exists() else []
        events.unlink(missing_ok=True)
        return [ln.split()[0] for ln in lines if ln.strip()]

    return launched


def _args(store: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--store", str(store), "--set", f"execution.runs_dir={tmp_path / 'runs'}",
            "--set", "execution.retry_delay_s=0", *extra]


def run_cli(store, tmp_path, *extra, expect=0, command="run") -> dict:
    """`rlhf <command>` (run, or sweep) on the test's store; its --summary-json record."""
    summary = tmp_path / "summary.json"
    summary.unlink(missing_ok=True)
    rc = main([command, *_args(store, tmp_path, *extra), "--summary-json", str(summary)])
    assert rc == expect
    return json.loads(summary.read_text())


def statuses(summary: dict) -> dict[str, str]:
    return {s: v["status"] for s, v in summary["stages"].items()}


# ---- units ----------------------------------------------------------------------------------------------------
def test_parse_progress_and_names():
    from flows.stage_loop import run_name
    from flows.observe import artifact_key, parse_progress

    assert parse_progress("step 12/100 loss=0.5 kl=1e-3") == (12, 100, {"loss": 0.5, "kl": 0.001})
    assert parse_progress("[rank0] ppo step: 3 / 40 reward=-1.5")[:2] == (3, 40)
    assert parse_progress("loading model") is None
    assert artifact_key("rlhf", "PPO", "progress") == "rlhf-ppo-progress"
    cfg = load_config(None, ["ppo.kl_coef=0.07"])
    name = run_name(cfg)
    assert name.startswith("demo-kl_coef0.07-") and name != run_name(load_config(None))


def test_cache_key_is_the_stage_key():
    from flows.pipeline import StageKeyPolicy

    key = StageKeyPolicy().compute_key(None, {"spec": {"stage": "ppo", "key": "abc123"}, "inputs": {}}, {})
    assert key == "rlhf-v1-ppo-abc123"


def test_plan_reasons_without_prefect(fakes, tmp_path, prefect_api, capsys):
    """`rlhf plan` explains every stage and never imports Prefect (checked in a fresh interpreter)."""
    store = tmp_path / "store"
    env = dict(os.environ)
    code = ("import sys; from rlhf_tasks.cli import main; rc = main(sys.argv[1:]); "
            "assert 'prefect' not in sys.modules, 'plan imported prefect'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "plan", *_args(store, tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("will-run") == 5 and "no data artifact in the store yet" in out.stdout

    run_cli(store, tmp_path, "--until", "ppo")
    fakes()
    capsys.readouterr()
    rc = main(["plan", *_args(store, tmp_path, "--set", "ppo.kl_coef=0.07"), "--json"])
    assert rc == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert [rows[s]["status"] for s in stages.STAGES] == ["cached", "cached", "cached", "will-run", "will-run"]
    assert rows["ppo"]["reason"] == f"ppo.kl_coef {load_config(None).ppo.kl_coef} -> 0.07"
    assert rows["eval"]["reason"] == "no eval artifact in the store yet"
    assert fakes() == []  # plan launched nothing


def test_same_config_twice_is_all_cached(fakes, tmp_path, prefect_api, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # both runs on the harness, whatever ran before
    store = tmp_path / "store"
    first = run_cli(store, tmp_path)
    assert statuses(first) == dict.fromkeys(stages.STAGES, "ran")
    assert fakes() == list(stages.STAGES)
    assert first["stages"]["sft"]["metrics"]["fake_loss"] == 0.25
    out = capsys.readouterr().out
    assert "STAGE" in out and "ARTIFACT" in out and "step 4/4" in out

    second = run_cli(store, tmp_path)
    assert statuses(second) == dict.fromkeys(stages.STAGES, "cached")
    assert {v["prefect_state"] for v in second["stages"].values()} == {"Cached"}  # Prefect's own cache hit
    assert fakes() == []
    assert [v["uri"] for v in second["stages"].values()] == [v["uri"] for v in first["stages"].values()]
    # Records live in the store; the run record is saved for `rlhf report`.
    assert len(list((store / "_prefect" / "cache").iterdir())) == 5
    rec = json.loads((store / "runs" / f"{second['run_id']}.json").read_text())
    assert rec["eval_uri"] == second["stages"]["eval"]["uri"]
    # Prefect artifacts, keyed by experiment, on each stage's own task run: progress (parsed from `step i/n`
    # lines), metrics table + samples, the stage key, the URI and the download command (a local store has no
    # browser link: no file:// link).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        def artifacts(run_id):
            found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            return {a.key: a for a in found if a.key}

        first_arts, second_arts = artifacts(first["run_id"]), artifacts(second["run_id"])
    assert first_arts["demo-sft-progress"].data == 100.0
    eval_md = first_arts["demo-eval-metrics"].data
    assert "fake_loss" in eval_md and "Samples" in eval_md
    # The progress artifact is made inside the stage's task run; the metrics one is on that same task run.
    for s in stages.STAGES:
        assert first_arts[f"demo-{s}-metrics"].task_run_id == first_arts[f"demo-{s}-progress"].task_run_id
    cached_tasks = {second_arts[f"demo-{s}-metrics"].task_run_id for s in stages.STAGES}
    assert None not in cached_tasks and len(cached_tasks) == 5  # each cached stage's own (new) task run
    assert not cached_tasks & {first_arts[f"demo-{s}-metrics"].task_run_id for s in stages.STAGES}
    for s in stages.STAGES:  # ran, then cached: the status, the URI, the key and the download command
        for arts, status in ((first_arts, "ran"), (second_arts, "cached")):
            art = arts[f"demo-{s}-metrics"]
            assert f"### {s}: {status}" in art.data
            assert f"`{first['stages'][s]['key']}`" in art.data and f"`rlhf store get {first['stages'][s]['uri']}`" in art.data
            assert "file://" not in art.data
    assert not any(k.endswith("-artifact") for k in first_arts)  # no link artifact without an http(s) link
    # The flow run's final state message (the run header) and so its last log line (as the run log has it; the UI
    # shows the same records) point at the report.
    [run_log] = [f for f in (tmp_path / "runs").glob("*/run.log") if second["run_id"] in f.read_text()]
    flow_lines = [ln.split(" prefect.flow_runs: ", 1)[1] for ln in run_log.read_text().splitlines()
                  if " prefect.flow_runs: " in ln]
    report = (f"report: {second['stages']['eval']['uri']}/report.md; in Prefect: the eval task run's artifacts "
              f"(demo-eval-report); from a shell: `rlhf report {second['run_id']} --store {store}`")
    assert flow_lines[-2:] == [report, f"Finished in state Completed({report!r})"]


def test_run_checks_and_plans_once_and_the_flow_plans_a_bare_config(fakes, tmp_path, prefect_api, monkeypatch):
    """`rlhf run` checks the inputs and computes the stage keys once and hands the plan to the flow; called with
    a bare config (the UI, deployments) the flow checks and plans itself. The rows are read once (validated with the
    tokenizer) when the data stage is going to run, and not at all when its artifact is cached."""
    from rlhf_tasks.data import stage as data_stage

    calls = {"plan": 0, "validate": 0}
    fingerprints, validate = stages.data_source_fingerprints, data_stage.validate_sources

    def counted_fingerprints(cfg):  # plan() computes the data key from these: one call per plan
        calls["plan"] += 1
        return fingerprints(cfg)

    def counted_validate(*args, **kwargs):
        calls["validate"] += 1
        return validate(*args, **kwargs)

    monkeypatch.setattr(stages, "data_source_fingerprints", counted_fingerprints)
    monkeypatch.setattr(data_stage, "validate_sources", counted_validate)
    store = tmp_path / "store"
    first = run_cli(store, tmp_path, "--until", "sft")
    assert statuses(first) == {"data": "ran", "sft": "ran"} and calls == {"plan": 1, "validate": 1}

    from flows.pipeline import rlhf_pipeline

    cfg = load_config(None, [f"store.url={store}", f"execution.runs_dir={tmp_path / 'runs'}"])
    record = rlhf_pipeline(config=cfg, until="reward")
    assert {s: v["status"] for s, v in record["stages"].items()} == {"data": "cached", "sft": "cached",
                                                                      "reward": "ran"}
    assert calls == {"plan": 2, "validate": 1}  # data is cached: the fit check uses its manifest's row counts
    assert fakes() == ["data", "sft", "reward"]
    from rlhf_tasks.errors import ConfigError
    from rlhf_tasks.store import ArtifactStore

    plans = stages.plan(cfg, ArtifactStore.from_config(cfg.store), "sft")
    with pytest.raises(ConfigError, match="overrides: the given stage_plans were computed"):
        rlhf_pipeline(config=cfg, until="sft", overrides=["ppo.kl_coef=0.2"], stage_plans=plans)
    with pytest.raises(ConfigError, match="until: 'reward' but the given plan ends at 'sft'"):
        rlhf_pipeline(config=cfg, until="reward", stage_plans=plans)
    assert fakes() == []


def test_changing_a_ppo_setting_reruns_only_ppo_and_eval(fakes, tmp_path, prefect_api):
    store = tmp_path / "store"
    first = run_cli(store, tmp_path)
    fakes()
    cfg = load_config(None, [f"store.url={store}", "ppo.kl_coef=0.07"])
    from rlhf_tasks.store import ArtifactStore

    p = stages.plan(cfg, ArtifactStore.from_config(cfg.store))
    assert [x.cached for x in p] == [True, True, True, False, False]
    second = run_cli(store, tmp_path, "--set", "ppo.kl_coef=0.07")
    assert statuses(second) == {"data": "cached", "sft": "cached", "reward": "cached", "ppo": "ran", "eval": "ran"}
    assert fakes() == ["ppo", "eval"]
    assert second["stages"]["ppo"]["uri"] != first["stages"]["ppo"]["uri"]
    assert second["flow_run_name"].startswith("demo-kl_coef0.07-")


def test_deleted_or_corrupt_artifact_reruns_that_stage_only(fakes, tmp_path, prefect_api):
    from rlhf_tasks.store import ArtifactStore

    store_dir = tmp_path / "store"
    first = run_cli(store_dir, tmp_path)
    fakes()
    store = ArtifactStore(str(store_dir))
    store.delete("sft", first["stages"]["sft"]["key"])
    result = store_dir / "reward" / first["stages"]["reward"]["key"] / "result.json"
    result.write_text(result.read_text() + " ")  # size no longer matches the manifest
    second = run_cli(store_dir, tmp_path)
    assert statuses(second) == {"data": "cached", "sft": "ran", "reward": "ran", "ppo": "cached", "eval": "cached"}
    assert sorted(fakes()) == ["reward", "sft"]
    assert second["stages"]["sft"]["prefect_state"] == "Completed"  # the stale cache record was not honoured
    assert all(store.exists(s, v["key"]) for s, v in second["stages"].items())


def test_flipped_byte_is_recomputed_never_consumed(fakes, tmp_path, prefect_api, capsys):
    """One flipped byte (same size) in the sft artifact: plan says sft fails verification and will re-run; the run
    recomputes it before PPO reads it, so PPO consumes the good bytes."""
    store_dir = tmp_path / "store"
    first = run_cli(store_dir, tmp_path, "--until", "sft")
    fakes()
    result = store_dir / "sft" / first["stages"]["sft"]["key"] / "result.json"
    good = result.read_bytes()
    result.write_bytes(good[:10] + bytes([good[10] ^ 0x20]) + good[11:])
    capsys.readouterr()
    assert main(["plan", *_args(store_dir, tmp_path, "--until", "ppo"), "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["sft"]["status"] == "will-run"
    assert rows["sft"]["reason"].startswith("failed verification (") and "result.json sha256 mismatch" in \
        rows["sft"]["reason"]
    second = run_cli(store_dir, tmp_path, "--until", "ppo")
    assert statuses(second) == {"data": "cached", "sft": "ran", "reward": "ran", "ppo": "ran"}
    assert sorted(fakes()) == ["ppo", "reward", "sft"]
    assert result.read_bytes() == good
    ppo = json.loads((store_dir / "ppo" / second["stages"]["ppo"]["key"] / "result.json").read_text())
    assert ppo["consumed"]["sft"] == good.decode()


@pytest.mark.parametrize("mode", ["prefect", "no-prefect"])
def test_killed_stage_is_retried_announced_and_resumes(fakes, tmp_path, prefect_api, monkeypatch, capsys, mode):
    store = tmp_path / "store"
    monkeypatch.setenv("FAKE_CRASH_STAGE", "sft")
    extra = ["--no-prefect"] if mode == "no-prefect" else []
    summary = run_cli(store, tmp_path, "--until", "sft", "--set", "execution.retries=1", *extra)
    assert statuses(summary) == {"data": "ran", "sft": "ran"}
    events = [ln.split()[:2] for ln in (tmp_path / "events.txt").read_text().splitlines()]
    assert events == [["data", "0"], ["sft", "0"], ["sft", "2"]]  # killed at step 2, retried, resumed from step 2
    assert summary["stages"]["sft"]["metrics"]["resumed_from_step"] == 2
    # The retry is announced on the console and in the stage log, between the two attempts' lines.
    announced = [ln for ln in capsys.readouterr().out.splitlines() if "attempt" in ln]
    assert len(announced) == 1 and announced[0].startswith("sft: attempt 1 failed (exit code ")
    assert announced[0].endswith("; retrying in 0 s")
    [log_file] = (tmp_path / "runs").glob(f"{summary['flow_run_name']}-*/sft/sft.log")  # the run's own folder
    log = log_file.read_text().splitlines()
    at = log.index(f"[retry] {announced[0]}")
    assert "crashing" in log[at - 1] and any(ln.startswith("step 3/4") for ln in log[at:])


@pytest.mark.parametrize("mode", ["prefect", "no-prefect"])
def test_bad_input_found_inside_a_job_is_not_retried_and_exits_2(fakes, tmp_path, prefect_api, monkeypatch, capsys,
                                                                mode):
    store = tmp_path / "store"
    monkeypatch.setenv("FAKE_BAD_INPUT_STAGE", "sft")
    extra = ["--no-prefect"] if mode == "no-prefect" else []
    summary = run_cli(store, tmp_path, "--until", "sft", "--set", "execution.retries=2", *extra, expect=2)
    assert statuses(summary) == {"data": "ran", "sft": "failed"}
    assert fakes() == ["data", "sft"]  # one sft attempt: the same input would fail the same way
    out, err = capsys.readouterr()
    assert "attempt" not in out
    [log_file] = (tmp_path / "runs").glob(f"{summary['flow_run_name']}-*/sft/sft.log")  # the run's own folder
    assert err.strip().splitlines() == [
        f"error: sft: fake.jsonl:3:prompt: bad row found inside the sft job (log: {log_file})"]


def test_real_cli_prints_one_line_and_keeps_tracebacks_in_the_run_log(fakes, tmp_path, site_dir):
    """The `rlhf` process with the fake stages (here too, through sitecustomize) on its own temporary Prefect API:
    bad input inside a job gives exactly one stderr line and no traceback on the console; the run log has it."""
    env = {**os.environ, "FAKE_BAD_INPUT_STAGE": "sft"}
    r = subprocess.run([sys.executable, "-m", "rlhf_tasks.cli", "run", *_args(tmp_path / "store", tmp_path),
                        "--until", "sft"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "bad row found inside the sft job" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "attempt" not in r.stdout
    run_log = next((tmp_path / "runs").glob("*/run.log")).read_text()
    assert f"run log {next((tmp_path / 'runs').glob('*/run.log'))}" in r.stdout
    assert "Traceback" in run_log and "JobInputError" in run_log


def test_train_stage_flow_reports_bad_input_so_the_pipeline_does_not_retry(fakes, tmp_path, prefect_api,
                                                                           monkeypatch):
    """On a work pool a stage runs as a train-stage flow run: its job's exit 2 comes back as the flow run's final
    message, which the pipeline turns into the same never-retried bad-input error as a local job."""
    from flows.runner import pool_failure
    from flows.stage_loop import is_retryable, spec_for
    from flows.train_stage import train_stage
    from rlhf_tasks.errors import JobInputError, StageFailed
    from rlhf_tasks.store import ArtifactStore

    monkeypatch.setenv("FAKE_BAD_INPUT_STAGE", "sft")
    monkeypatch.setenv("RLHF_RUNS_DIR", str(tmp_path / "worker"))
    cfg = load_config(None, [f"store.url={tmp_path / 'store'}"])
    store = ArtifactStore.from_config(cfg.store)
    sft = stages.plan(cfg, store, "sft")[1]
    state = train_stage(spec=dataclasses.asdict(spec_for(cfg, store, sft, tmp_path / "run")), return_state=True)
    assert state.is_failed() and fakes() == ["sft"]
    error = pool_failure("sft", "r (id)", state)
    assert isinstance(error, JobInputError) and not is_retryable(error)
    assert str(error).startswith("sft: fake.jsonl:3:prompt: bad row found inside the sft job (log: ")
    monkeypatch.setenv("FAKE_FAIL_STAGE", "sft")
    monkeypatch.delenv("FAKE_BAD_INPUT_STAGE")
    state = train_stage(spec=dataclasses.asdict(spec_for(cfg, store, sft, tmp_path / "run")), return_state=True)
    error = pool_failure("sft", "r (id)", state)
    assert state.is_failed() and isinstance(error, StageFailed) and is_retryable(error)


def test_default_retry_policy_rides_out_a_minute_of_outage():
    from flows.stage_loop import is_retryable, retry_delays
    from rlhf_tasks.config import ExecutionConfig
    from rlhf_tasks.errors import DataError, JobInputError, StageFailed

    delays = retry_delays(ExecutionConfig())
    assert delays == [10.0, 20.0, 40.0] and sum(delays) > 60  # the last attempt starts after the outage
    assert is_retryable(StageFailed("sft", "exit code 137")) and is_retryable(OSError("connection reset"))
    assert not is_retryable(JobInputError("sft: x.jsonl:3:prompt: bad")) and not is_retryable(DataError("x"))
    assert not is_retryable(KeyboardInterrupt())


def test_failed_stage_exits_1_with_stage_and_log(fakes, tmp_path, prefect_api, monkeypatch, capsys):
    store = tmp_path / "store"
    monkeypatch.setenv("FAKE_FAIL_STAGE", "reward")
    summary = run_cli(store, tmp_path, "--until", "reward", "--set", "execution.retries=0", expect=1)
    err = capsys.readouterr().err
    assert "stage 'reward' failed" in err and "exit code 3" in err
    log = Path(err.split("(log: ")[1].split(")")[0])
    assert log.exists() and "fake failure" in log.read_text()
    assert statuses(summary) == {"data": "ran", "sft": "ran", "reward": "failed"}


def test_bad_input_exits_2_before_anything_runs(fakes, tmp_path, capsys):
    rc = main(["run", *_args(tmp_path / "store", tmp_path, "--set", "ppo.kl_coef=-1")])
    assert rc == 2 and "ppo.kl_coef" in capsys.readouterr().err
    assert fakes() == []


def test_no_prefect_mode_uses_the_same_cache(fakes, tmp_path, prefect_api):
    store = tmp_path / "store"
    first = run_cli(store, tmp_path, "--until", "sft", "--no-prefect")
    assert statuses(first) == {"data": "ran", "sft": "ran"}
    second = run_cli(store, tmp_path, "--until", "reward")
    assert statuses(second) == {"data": "cached", "sft": "cached", "reward": "ran"}


def test_s3_store_keeps_cache_records_in_the_bucket(fakes, tmp_path, prefect_api, moto_server, s3_bucket,
                                                    monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    url = f"{s3_bucket}/exp"
    first = run_cli(url, tmp_path, "--until", "sft")
    assert statuses(first) == {"data": "ran", "sft": "ran"}
    second = run_cli(url, tmp_path, "--until", "sft")
    assert {v["prefect_state"] for v in second["stages"].values()} == {"Cached"}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True,
                           use_listings_cache=False)
    assert len(fs.ls(f"{url}/_prefect/cache")) == 2
    assert fs.exists(f"{url}/runs/{second['run_id']}.json")


def test_a_name_given_in_the_form_is_kept_and_generated_names_are_unique(fakes, tmp_path, prefect_api):
    """A flow run created with a name (the UI form, run_deployment) keeps it; one Prefect named (`word-word`) is
    renamed to what differs (until included) plus a piece of its id, so two runs of one config differ."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.pipeline import rlhf_pipeline

    params = {"config": load_config(None, [f"store.url={tmp_path / 'store'}",
                                           f"execution.runs_dir={tmp_path / 'runs'}"]).model_dump(mode="json"),
              "until": "data", "overrides": ["ppo.kl_coef=0.05"]}
    names = []
    with get_client(sync_client=True) as client:
        for given in ("KL sweep: baseline", "brave-otter", "calm-heron"):
            run = client.create_flow_run(rlhf_pipeline, name=given, parameters=params)
            run_flow(rlhf_pipeline, flow_run=run, parameters=params)
            names.append(client.read_flow_run(run.id).name)
    assert names[0] == "KL sweep: baseline"
    for name in names[1:]:
        assert name.startswith("demo-kl_coef0.05-until-data-") and len(name.rsplit("-", 1)[1]) == 6
    assert names[1] != names[2]
    assert fakes() == ["data"]


def test_pull_step_reads_the_workers_project_dir_at_run_time(tmp_path, monkeypatch, prefect_api):
    """`prefect deploy` templates the pull steps with the deploying machine's environment: our step has nothing
    to fill in, and run on the "worker" (Prefect's own run_steps) it goes to the worker's folder."""
    import asyncio
    import os

    import yaml
    from prefect.deployments.steps.core import run_steps
    from prefect.utilities.templating import apply_values

    pull = yaml.safe_load((TESTS.parent / "deployments" / "prefect.yaml").read_text())["pull"]
    monkeypatch.setenv("RLHF_PROJECT_DIR", "/home/laptop/rlhf-tasks")  # the deploying machine
    stored = apply_values(pull, dict(os.environ), remove_notset=False)  # what `prefect deploy` does with them
    assert "/home/laptop" not in str(stored)

    worker_dir = tmp_path / "checkout"
    worker_dir.mkdir()
    monkeypatch.setenv("RLHF_PROJECT_DIR", str(worker_dir))  # the worker, later
    monkeypatch.chdir(tmp_path)
    outputs = asyncio.run(run_steps(stored))
    assert Path.cwd() == worker_dir and outputs["directory"] == str(worker_dir)

    monkeypatch.delenv("RLHF_PROJECT_DIR")
    with pytest.raises(Exception) as failed:
        asyncio.run(run_steps(stored))
    assert "RLHF_PROJECT_DIR is not set on this worker" in str(failed.value.__cause__)
