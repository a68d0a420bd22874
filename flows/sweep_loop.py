"""The sweep loop shared by the `rlhf-sweep` flow and `rlhf sweep --no-prefect`, and what a sweep leaves behind:
one run record per variant (`runs/<sweep run id>-<i>.json`: `rlhf report` and `store gc` know them), the sweep
record and its comparison report under `sweeps/<sweep id>/` (sweep.json, sweep-report.md, plots/).
Importing this module never imports Prefect."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlhf_tasks.config.grid import GridAxis
from rlhf_tasks.errors import JobInputError, StageFailed, UserError
from rlhf_tasks.stages import StagePlan
from rlhf_tasks.store import ArtifactStore
from rlhf_tasks.sweep import SweepPlan

from .stage_loop import GraphResult, RunResult, finish_run, run_graph

SWEEPS_PREFIX = "sweeps"
RunOne = Callable[[StagePlan, bool, dict[str, str]], tuple[str, dict]]


def sweep_name(experiment: str, sweep_id: str) -> str:
    return f"{experiment}-sweep-{sweep_id[:6]}"


def run_sweep(store: ArtifactStore, sp: SweepPlan, run_one_for: Callable[[int], RunOne],
              echo: Callable[[str], None], max_parallel: int) -> GraphResult:
    """Every distinct stage of the sweep once (`sp.nodes`), as soon as its inputs are done, up to `max_parallel`
    at once; a failed stage stops only the variants that need it. A stage runs with the config of the first
    variant using it (`run_one_for(variant index)`): the variants sharing it have the same key, so the same slice."""
    owner = {p.uri: sp.users(p.uri)[0] for p in sp.nodes}

    def run_one(p: StagePlan, cached_now: bool, upstream: dict[str, str]) -> tuple[str, dict]:
        return run_one_for(owner[p.uri])(p, cached_now, upstream)

    def label(p: StagePlan) -> str:
        names = sp.variant_names(p.uri)
        return p.stage if names == "all" else f"{p.stage} [{names}]"

    return run_graph(store, sp.nodes, run_one, echo, max_parallel, keep_going=True, label=label)


@dataclass
class SweepResult:
    """The sweep record as saved (None when it could not be saved), the report's URI, and each failed variant's
    error {variant name: exception}."""

    record: dict | None
    report_uri: str | None = None
    errors: dict[str, BaseException] = field(default_factory=dict)
    interrupted: BaseException | None = None


def finish_sweep(graph: GraphResult, store: ArtifactStore, sp: SweepPlan, *, sweep_id: str, run_id: str,
                 name: str, grid: list[GridAxis], until: str, started: float, max_parallel: int, orchestrator: str,
                 report_dir: Path) -> SweepResult:
    """Save one run record per variant, the sweep record and the comparison report (written in `report_dir`, then
    copied to `sweeps/<sweep_id>/`)."""
    from rlhf_tasks.evaluation.sweep_report import write_sweep_report

    variants, errors = [], {}
    for i, (v, plans) in enumerate(zip(sp.variants, sp.plans)):
        stages = {p.stage: graph.entries[p.uri] for p in plans if p.uri in graph.entries}
        error = next((graph.errors[p.uri] for p in plans if p.uri in graph.errors), None)
        if error is None and len(stages) < len(plans):  # stopped before all its stages ran (Ctrl-C)
            error = graph.interrupted or RuntimeError("stopped before its stages ran")
        run = finish_run(RunResult(stages=stages, error=error), store, run_id=f"{run_id}-{i}",
                         name=f"{name}-{v.slug}", cfg=v.cfg, until=until, started=started,
                         orchestrator=orchestrator)
        if run.error is not None:
            errors[v.name] = run.error
        variants.append({"name": v.name, "assignment": v.assignment, "run_id": f"{run_id}-{i}",
                         "status": "failed" if run.error is not None else "completed",
                         "error": None if run.error is None else str(run.error), "stages": stages})
    shared = [p.stage for p in sp.nodes if len(sp.users(p.uri)) == len(sp.variants) > 1]
    record = {"sweep_id": sweep_id, "run_id": run_id, "flow_run_name": name, "orchestrator": orchestrator,
              "status": "failed" if errors else "completed", "until": until, "store": store.url,
              "started": started, "wall_s": round(time.time() - started, 3), "max_parallel": max_parallel,
              "grid": [{"key": a.key, "values": list(a.values)} for a in grid], "shared": shared,
              "variants": variants}
    result = SweepResult(record=None, errors=errors, interrupted=graph.interrupted)
    try:
        report = write_sweep_report(record, report_dir)
        for f in sorted(p for p in report.parent.rglob("*") if p.is_file()):
            uri = store.write_file(f"{SWEEPS_PREFIX}/{sweep_id}/{f.relative_to(report.parent).as_posix()}",
                                   f.read_bytes())
            if f == report:
                result.report_uri = record["report"] = uri
        store.write_json(f"{SWEEPS_PREFIX}/{sweep_id}/sweep.json", record)
    except OSError as e:  # the variants' records are saved; a sweep whose report the store refused failed
        result.errors.setdefault("report", OSError(e.errno, f"sweep report not saved: {e.strerror or e}"))
        return result
    result.record = record
    return result


def sweep_error(result: SweepResult, total: int) -> BaseException | None:
    """What ends a sweep with failed variants (after its report is written): bad input (exit 2) when every failure
    was bad input found inside a job, else a StageFailed naming the failed variants and the first one's error."""
    if result.interrupted is not None:
        return result.interrupted
    if not result.errors:
        return None
    names = [n for n in result.errors if n != "report"]
    first = next(iter(result.errors.values()))
    text = " ".join(str(first).split()) or type(first).__name__
    line = f"{len(names)} of {total} variants failed ({', '.join(names)}); {names[0]}: {text}" if names else text
    if all(isinstance(e, UserError) for e in result.errors.values()):
        return JobInputError(line)
    return StageFailed("sweep", line)
