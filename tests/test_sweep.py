"""Parallel stages and sweeps with the stand-in stage jobs of tests/flow_fake_stages.py (real subprocesses, real
Prefect): SFT and the reward model overlap when there are two slots; a sweep plans every variant once, runs the
stages they share once, keeps going when a variant fails, writes its comparison report, and a value added later
runs only its own variant. Bad grid input is one line naming the --grid argument, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_tasks import stages
from rlhf_tasks.cli import main
from rlhf_tasks.config import load_config
from test_flows import _args, fakes, prefect_api, run_cli, site_dir, statuses  # noqa: F401  (fixtures)

GRID = "ppo.kl_coef=0.05,0.1,0.2"


def sweep_cli(store, tmp_path, *extra, expect=0) -> dict:
    return run_cli(store, tmp_path, *extra, expect=expect, command="sweep")


def by_variant(record: dict) -> dict[str, dict[str, str]]:
    return {v["name"]: statuses(v) for v in record["variants"]}


# ---- grid input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("item, says", [
    ("ppo.klcoef=0.05,0.1", "ppo.klcoef: unknown key"),
    ("ppo.kl_coef=0.05,abc", "ppo.kl_coef: Input should be a valid number"),
    ("ppo.kl_coef=-1,0.1", "ppo.kl_coef"),
    ("ppo.kl_coef=", "no values"),
    ("ppo.kl_coef=0.1,,0.2", "an empty value"),
    ("ppo.kl_coef", "expected KEY=V1,V2"),
    ("ppo..kl=1,2", "bad key"),
    ("ppo.kl_coef=0.1,0.1", "value 0.1 given twice"),
    ("store.url=a,b", "cannot vary in a sweep"),
    ("ppo.kl_coef.x=1,2", "ppo.kl_coef is not a section"),
])
@pytest.mark.parametrize("command", ["sweep", "plan"])
def test_bad_grid_is_one_line_naming_the_argument_and_writes_nothing(tmp_path, capsys, command, item, says):
    rc = main([command, *_args(tmp_path / "store", tmp_path), "--grid", "sft.optim.lr=1e-3,2e-3", "--grid",
               item])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --grid {item}: ") and says in err[0]
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


def test_the_same_key_twice_and_no_grid_are_refused(tmp_path, capsys):
    rc = main(["sweep", *_args(tmp_path / "store", tmp_path), "--grid", "ppo.kl_coef=0.1", "--grid",
               "ppo.kl_coef=0.2"])
    assert rc == 2 and "--grid ppo.kl_coef=0.2: ppo.kl_coef is already an axis (--grid ppo.kl_coef=0.1)" in \
        capsys.readouterr().err
    assert main(["sweep", *_args(tmp_path / "store", tmp_path)]) == 2
    assert "--grid" in capsys.readouterr().err and not (tmp_path / "store").exists()


@pytest.mark.parametrize("args, says", [
    (["--grid", "dpo.beta=0.1,0.2"], "--grid dpo.beta=0.1,0.2: every value plans the same stages (no stage of "
     "method ppo up to eval reads dpo.beta)"),
    (["--grid", "ppo.kl_coef=0.1,0.2", "--until", "reward"], "--grid ppo.kl_coef=0.1,0.2: every value plans the "
     "same stages (no stage of method ppo up to reward reads ppo.kl_coef)"),
    (["--set", "method=dpo", "--grid", "sft.optim.lr=1e-3,2e-3", "--grid", "ppo.kl_coef=0.1,0.2"],
     "--grid ppo.kl_coef=0.1,0.2: every value plans the same stages (no stage of method dpo up to eval reads "
     "ppo.kl_coef)"),
])
@pytest.mark.parametrize("command", ["sweep", "plan"])
def test_an_axis_no_stage_reads_is_refused_before_anything_is_written(tmp_path, capsys, command, args, says):
    rc = main([command, *_args(tmp_path / "store", tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {says}"]
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


def test_an_axis_that_matters_for_some_values_of_another_is_kept(tmp_path, capsys):
    rc = main(["plan", *_args(tmp_path / "store", tmp_path), "--grid", "method=ppo,dpo", "--grid",
               "dpo.beta=0.1,0.2", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    policy = [(n["stage"], n["variants"]) for n in json.loads(out.out) if n["stage"] in ("ppo", "dpo")]
    assert policy == [("ppo", ["method=ppo,beta=0.1", "method=ppo,beta=0.2"]),  # beta: not read by ppo, one run
                      ("dpo", ["method=dpo,beta=0.1"]), ("dpo", ["method=dpo,beta=0.2"])]


def test_grid_values_parse_like_set_and_name_the_variants():
    from rlhf_tasks.sweep import expand, grid_labels, parse_grid_arg, split_values

    assert split_values("[1,2],[3],{a: 1, b: 2}") == ["[1,2]", "[3]", "{a: 1, b: 2}"]
    axes = [parse_grid_arg("ppo.kl_coef=5e-2,0.1"), parse_grid_arg("sft.optim.lr=1e-4,2e-4"),
            parse_grid_arg("reward.optim.lr=1e-5")]
    assert axes[0].values == [0.05, 0.1]
    variants = expand(load_config(None), axes, grid_labels(axes))
    assert [v.name for v in variants][:2] == ["kl_coef=0.05,sft.optim.lr=0.0001,reward.optim.lr=1e-05",
                                              "kl_coef=0.05,sft.optim.lr=0.0002,reward.optim.lr=1e-05"]
    assert len(variants) == 4 and variants[3].cfg.ppo.kl_coef == 0.1 and variants[3].cfg.sft.optim.lr == 2e-4
    assert variants[0].slug == "kl_coef0.05_sft.optim.lr0.0001_reward.optim.lr1e-05"


# ---- planning ---------------------------------------------------------------------------------------------
def test_sweep_plan_shares_data_sft_reward_across_three_variants(fakes, tmp_path, capsys):
    rc = main(["plan", *_args(tmp_path / "store", tmp_path), "--grid", GRID, "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["stage"] for r in rows] == ["data", "sft", "reward", "ppo", "ppo", "ppo", "eval", "eval",
                                                       "eval"]
    names = ["kl_coef=0.05", "kl_coef=0.1", "kl_coef=0.2"]
    assert [r["variants"] for r in rows[:3]] == [names] * 3  # planned once, used by every variant
    assert [r["variants"] for r in rows[3:]] == [[n] for n in names] * 2
    assert len({r["key"] for r in rows}) == 9
    # each variant's eval reads its own ppo and the shared sft/reward
    ppo_uri = {r["variants"][0]: r["uri"] for r in rows if r["stage"] == "ppo"}
    for r in rows[6:]:
        assert r["inputs"]["ppo"] == ppo_uri[r["variants"][0]] and r["inputs"]["sft"] == rows[1]["uri"]
    assert fakes() == [] and not (tmp_path / "store").exists()


# ---- running ----------------------------------------------------------------------------------------------
def test_independent_stages_overlap_with_two_slots(fakes, tmp_path, site_dir):
    """The real `rlhf` process (its own temporary Prefect API) with two slots: SFT and the reward model each wait
    until the other one has started (a rendezvous in the fake jobs), so they complete only when they ran at the
    same time; the summary's started_at/finished_at show the overlap, and the run log still gets Prefect's records
    of the task runs started in worker threads."""
    summary = tmp_path / "summary.json"
    env = {**os.environ, "FAKE_RENDEZVOUS": f"{tmp_path / 'meet'}:sft,reward"}
    r = subprocess.run([sys.executable, "-m", "rlhf_tasks.cli", "run", *_args(tmp_path / "store", tmp_path),
                        "--until", "reward", "--set", "execution.max_parallel_stages=2", "--summary-json",
                        str(summary)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    record = json.loads(summary.read_text())
    assert statuses(record) == {"data": "ran", "sft": "ran", "reward": "ran"}
    sft, reward, data = record["stages"]["sft"], record["stages"]["reward"], record["stages"]["data"]
    assert sft["started_at"] < reward["finished_at"] and reward["started_at"] < sft["finished_at"]
    assert data["finished_at"] <= min(sft["started_at"], reward["started_at"])  # both waited for the data
    text = next((tmp_path / "runs").glob("*/run.log")).read_text()
    assert "sft: launching job" in text and "reward: launching job" in text and "rendezvous: sft met" in text


def test_sweep_runs_shared_stages_once_reports_and_adds_only_the_new_variant(fakes, tmp_path, prefect_api,
                                                                            monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the CLI uses the test's API: its artifacts
    store = tmp_path / "store"
    record = sweep_cli(store, tmp_path, "--grid", GRID, "--set", "execution.max_parallel_stages=3")
    launched = fakes()
    assert sorted(launched) == sorted(["data", "sft", "reward"] + ["ppo", "eval"] * 3)
    assert launched[:3] == ["data", "sft", "reward"] or launched[:3] == ["data", "reward", "sft"]
    assert by_variant(record) == {f"kl_coef={v}": dict.fromkeys(stages.STAGES, "ran") for v in (0.05, 0.1, 0.2)}
    assert record["shared"] == ["data", "sft", "reward"] and record["status"] == "completed"
    uris = [v["stages"] for v in record["variants"]]
    assert len({s["sft"]["uri"] for s in uris}) == 1 and len({s["ppo"]["uri"] for s in uris}) == 3
    report = Path(record["report"])
    assert "sweep" in report.name and report.parent.parent == store / "sweeps"
    text = report.read_text()
    for v in ("kl_coef=0.05", "kl_coef=0.1", "kl_coef=0.2", "SFT (shared baseline)", "gold", "RM score",
              "win rate vs SFT (RM)", "KL to SFT", "length"):
        assert v in text
    # one run record per variant, so `rlhf report` and `store gc` know every variant's artifacts
    for v in record["variants"]:
        rec = json.loads((store / "runs" / f"{v['run_id']}.json").read_text())
        assert rec["stages"]["ppo"]["uri"] == v["stages"]["ppo"]["uri"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[record["run_id"]])))
        run = client.read_flow_run(record["run_id"])
    keys = {a.key for a in arts}
    assert {"demo-sweep-report", "demo-sweep-table"} <= keys
    assert run.state.message == f"sweep report: {record['report']}"  # a local store: its URI, no browser link

    again = sweep_cli(store, tmp_path, "--grid", GRID)
    assert fakes() == [] and by_variant(again) == {f"kl_coef={v}": dict.fromkeys(stages.STAGES, "cached")
                                                    for v in (0.05, 0.1, 0.2)}

    more = sweep_cli(store, tmp_path, "--grid", GRID + ",0.3")
    assert fakes() == ["ppo", "eval"]  # only the new variant's own stages
    assert by_variant(more)["kl_coef=0.3"] == {"data": "cached", "sft": "cached", "reward": "cached", "ppo": "ran",
                                               "eval": "ran"}
    assert more["report"] != record["report"]


@pytest.mark.parametrize("mode", ["prefect", "no-prefect"])
def test_a_failed_variant_does_not_stop_the_others(fakes, tmp_path, prefect_api, monkeypatch, capsys, mode):
    monkeypatch.setenv("FAKE_FAIL_CONFIG", "ppo:ppo.kl_coef=0.1")
    extra = ["--no-prefect"] if mode == "no-prefect" else []
    record = sweep_cli(tmp_path / "store", tmp_path, "--grid", GRID, "--set", "execution.retries=0", *extra,
                       expect=1)
    got = by_variant(record)
    assert got["kl_coef=0.05"] == got["kl_coef=0.2"] == dict.fromkeys(stages.STAGES, "ran")
    assert got["kl_coef=0.1"] == {"data": "ran", "sft": "ran", "reward": "ran", "ppo": "failed"}  # no eval
    assert sorted(fakes()) == sorted(["data", "sft", "reward"] + ["ppo"] * 3 + ["eval"] * 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 3 variants failed (kl_coef=0.1)" in err[0] and "exit code 3" in err[0]
    report = Path(record["report"]).read_text()
    assert "Failed variants" in report and "kl_coef=0.1" in report
