"""flows/stage_loop.run_graph, the scheduler of runs and sweeps, with plain Python stages (no jobs, no Prefect):
dependency order, concurrency up to the limit, what a failure stops, and Ctrl-C."""
from __future__ import annotations

import threading

import pytest

from flows.stage_loop import run_graph, run_stages
from rlhf_tasks.launch import STOP_JOBS, stop_requested
from rlhf_tasks.stages import StagePlan


def node(stage: str, *inputs: StagePlan, variant: str = "") -> StagePlan:
    key = f"{stage}{variant}"
    return StagePlan(stage, key, f"mem://{stage}/{key}", False, "test", {}, {i.stage: i.uri for i in inputs})


@pytest.fixture
def diamond():
    """data -> (sft, reward) -> ppo -> eval, as a run of the ppo method has it."""
    data = node("data")
    sft, reward = node("sft", data), node("reward", data)
    ppo = node("ppo", data, sft, reward)
    return [data, sft, reward, ppo, node("eval", data, sft, reward, ppo)]


def recorder(fail: set[str] = frozenset(), meet: set[str] = frozenset(), barrier_s: float = 30.0):
    """run_one that records calls; stages in `meet` wait for each other at a barrier (they pass only together)."""
    calls: list[str] = []
    barrier = threading.Barrier(len(meet), timeout=barrier_s) if meet else None

    def run_one(p: StagePlan, cached_now: bool, upstream: dict[str, str]) -> tuple[str, dict]:
        assert set(upstream) == set(p.input_uris)  # every input was done before it started
        calls.append(p.key)
        if p.stage in meet:
            barrier.wait()
        if p.key in fail:
            raise RuntimeError(f"{p.key} broke")
        return p.uri, {"stop_visible": STOP_JOBS.get() is not None}

    return run_one, calls


def test_stages_run_after_their_inputs_in_plan_order(diamond, local_store):
    run_one, calls = recorder()
    result = run_stages(local_store, diamond, run_one, lambda _: None, max_parallel=1)
    assert calls == ["data", "sft", "reward", "ppo", "eval"] and result.error is None
    assert list(result.stages) == ["data", "sft", "reward", "ppo", "eval"]
    entries = list(result.stages.values())
    assert all(e["status"] == "ran" and e["started_at"] <= e["finished_at"] for e in entries)
    assert all(a["finished_at"] <= b["started_at"] for a, b in zip(entries, entries[1:]))  # one at a time


def test_independent_stages_run_together_in_threads_that_see_the_stop_event(diamond, local_store):
    run_one, calls = recorder(meet={"sft", "reward"})
    result = run_stages(local_store, diamond, run_one, lambda _: None, max_parallel=2)
    assert result.error is None and calls[0] == "data" and calls[-2:] == ["ppo", "eval"]
    assert all(e["stop_visible"] for e in result.stages.values())  # the scheduler's context reached the threads
    sft, reward = result.stages["sft"], result.stages["reward"]  # (the barrier proved it; the times agree)
    assert sft["started_at"] <= reward["finished_at"] and reward["started_at"] <= sft["finished_at"]


def test_one_slot_never_runs_two_at_once(diamond, local_store):
    run_one, _ = recorder(meet={"sft", "reward"}, barrier_s=1.0)  # they would have to meet: they cannot
    result = run_stages(local_store, diamond, run_one, lambda _: None, max_parallel=1)
    assert isinstance(result.error, threading.BrokenBarrierError)
    assert result.stages["sft"]["status"] == "failed" and "ppo" not in result.stages


def test_a_failure_stops_the_run_but_keep_going_only_stops_what_depends_on_it(local_store):
    data = node("data")
    sft = node("sft", data)
    a, b = node("ppo", data, sft, variant="a"), node("ppo", data, sft, variant="b")
    plans = [data, sft, a, b, node("eval", a, variant="a"), node("eval", b, variant="b")]
    run_one, calls = recorder(fail={"ppoa"})
    stopped = run_graph(local_store, plans, run_one, lambda _: None, max_parallel=1)
    assert calls == ["data", "sft", "ppoa"] and list(stopped.errors) == [a.uri]
    assert set(stopped.skipped) == {b.uri, plans[4].uri, plans[5].uri}

    run_one, calls = recorder(fail={"ppoa"})
    going = run_graph(local_store, plans, run_one, lambda _: None, max_parallel=2, keep_going=True)
    assert sorted(calls) == ["data", "evalb", "ppoa", "ppob", "sft"]
    assert going.entries[plans[5].uri]["status"] == "ran" and going.skipped == [plans[4].uri]
    assert str(going.first_error) == "ppoa broke"


@pytest.mark.parametrize("slots", [1, 2])
def test_ctrl_c_inside_a_stage_stops_everything(diamond, local_store, slots):
    seen_stop = []

    def run_one(p, cached_now, upstream):
        if p.stage == "sft":
            raise KeyboardInterrupt
        if p.stage == "reward":  # running beside sft: waits until the run is told to stop
            while not stop_requested():
                threading.Event().wait(0.01)
            seen_stop.append(True)
            raise KeyboardInterrupt("run stopped")
        return p.uri, {}

    result = run_stages(local_store, diamond, run_one, lambda _: None, max_parallel=slots)
    assert isinstance(result.error, KeyboardInterrupt) and "ppo" not in result.stages
    assert result.stages["sft"]["status"] == "failed"
    if slots == 2:
        assert seen_stop == [True] and result.stages["reward"]["status"] == "failed"
    assert STOP_JOBS.get() is None  # reset after the run
