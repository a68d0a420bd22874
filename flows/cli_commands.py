"""How `rlhf run` and `rlhf sweep` (rlhf_tasks/cli.py) execute a plan they have computed and checked: as the
`rlhf-pipeline` / `rlhf-sweep` flow (ephemeral Prefect API unless PREFECT_API_URL points at a server) or as local
subprocesses without Prefect. They return what the run left (a RunResult; a sweep record and its error) and print
nothing of the result. Nothing here imports the CLI."""
from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from rlhf_tasks.config import PipelineConfig
from rlhf_tasks.config.grid import GridAxis
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.stages import StagePlan
from rlhf_tasks.store import ArtifactStore
from rlhf_tasks.sweep import SweepPlan, sweep_id

from . import ephemeral, observe, sweep_loop
from .stage_loop import (RunResult, finish_run, launch_with_retries, read_run_record, run_dir, run_stages, spec_for,
                         stage_slots)


def _local_runner(cfg: PipelineConfig, store: ArtifactStore, folder: Path, echo: Callable[[str], None]):
    """`run_one` of the stage loop for jobs as local subprocesses (the same retry policy as the flow's)."""
    from .runner import launch_local

    def run_one(p: StagePlan, cached_now: bool, upstream: dict[str, str]) -> tuple[str, dict]:
        if cached_now:
            return p.uri, {}
        spec = spec_for(cfg, store, p, folder)
        log = observe.StageLog(p.stage, spec.run_dir)
        return launch_with_retries(spec, cfg.execution, lambda: launch_local(spec, cfg.execution, log), echo), {}

    return run_one


def run_without_prefect(cfg: PipelineConfig, store: ArtifactStore, plans: list[StagePlan], name: str,
                        echo: Callable[[str], None]) -> RunResult:
    """The same stage loop, cache rule (the store) and retry policy, with the jobs as local subprocesses."""
    if cfg.execution.work_pool:
        raise ConfigError("execution.work_pool needs Prefect (run without --no-prefect)")
    run_id = f"local-{uuid.uuid4()}"
    folder = run_dir(cfg, name, run_id)
    started = time.time()
    result = run_stages(store, plans, _local_runner(cfg, store, folder, echo), echo, max_parallel=stage_slots(cfg))
    return finish_run(result, store, run_id=run_id, name=name, cfg=cfg, until=plans[-1].stage, started=started,
                      orchestrator="none")


def run_sweep_without_prefect(cfg: PipelineConfig, store: ArtifactStore, sp: SweepPlan, axes: list[GridAxis],
                              until: str, name: str, echo: Callable[[str], None]) -> tuple[dict | None, BaseException | None]:
    """A sweep's stages as local subprocesses (sweep_loop); returns (sweep record, the error that failed it)."""
    if cfg.execution.work_pool:
        raise ConfigError("execution.work_pool needs Prefect (run without --no-prefect)")
    run_id = f"local-{uuid.uuid4()}"
    folder = run_dir(cfg, name, run_id)
    started = time.time()
    runners: dict[int, sweep_loop.RunOne] = {}

    def run_one_for(i: int) -> sweep_loop.RunOne:
        v = sp.variants[i]
        return runners.setdefault(i, _local_runner(v.cfg, store, folder / v.slug, echo))

    slots = stage_slots(cfg)
    graph = sweep_loop.run_sweep(store, sp, run_one_for, echo, slots)
    result = sweep_loop.finish_sweep(graph, store, sp, sweep_id=sweep_id(cfg, axes, until), run_id=run_id,
                                     name=name, grid=axes, until=until, started=started, max_parallel=slots,
                                     orchestrator="none", report_dir=folder / "report")
    return result.record, sweep_loop.sweep_error(result, len(sp.variants))


@contextlib.contextmanager
def _prefect_records_to(path: Path):
    """Append every record of Prefect's loggers (flow and task runs, with tracebacks) to `path` meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("prefect")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def _prefect_session(cfg: PipelineConfig, name: str, echo: Callable[[str], None]):
    """What a flow run started by the CLI runs in; yields the run's folder (its run log, its stage jobs)."""
    # The terminal gets our progress lines, the table and one error line; Prefect's own records (tracebacks
    # included) go to the Prefect API (the UI) and to the run log file.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # Prefect's 20 s default for the temporary server to come up is too short on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    folder = run_dir(cfg, name, uuid.uuid4().hex)  # the flow run's id comes later; the folder is needed now
    log_path = folder / "run.log"
    api = contextlib.nullcontext()
    if os.environ.get("PREFECT_API_URL"):
        where = f"API {os.environ['PREFECT_API_URL']}"
    else:
        where = "temporary local API for this run (set PREFECT_API_URL to use a server)"
        api = ephemeral.use(ephemeral.start(folder / "prefect-api.log"))  # ours, not Prefect's: flows/ephemeral.py
    echo(f"prefect: {where}; run log {log_path}")
    # Import the flows (and so Prefect, which configures its logging with dictConfig on import, dropping the
    # handlers its loggers had) before the run log's handler is attached, or the run log stays empty.
    from . import pipeline, sweep  # noqa: F401

    observe.set_console(echo)
    try:
        with api, _prefect_records_to(log_path):
            yield folder
    finally:
        observe.set_console(None)


def run_with_prefect(cfg: PipelineConfig, store: ArtifactStore, plans: list[StagePlan], name: str,
                     echo: Callable[[str], None]) -> RunResult:
    """Run the flow on `plans` (it does not plan again). The flow saves the run record in the store whether it
    completes or fails; a failed run's record is read back from there by the flow run's id."""
    with _prefect_session(cfg, name, echo) as folder:
        from .pipeline import rlhf_pipeline

        state = rlhf_pipeline.with_options(flow_run_name=name)(config=cfg, until=plans[-1].stage, stage_plans=plans,
                                                               run_folder=str(folder), return_state=True)
    if state.is_completed():
        record = state.result()
        return RunResult(stages=record["stages"], record=record)
    error = _state_error(state, name)
    record = read_run_record(store, str(state.state_details.flow_run_id))
    return RunResult(stages=(record or {}).get("stages", {}), error=error, record=record)


def _state_error(state, name: str) -> BaseException:
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):  # a state without its exception (e.g. cancelled from the UI)
        error = RuntimeError(f"flow run {name} ended {state.name}: {state.message or 'no message'}")
    return error


def run_sweep_with_prefect(cfg: PipelineConfig, store: ArtifactStore, sp: SweepPlan, axes: list[GridAxis],
                           until: str, name: str, echo: Callable[[str], None]) -> tuple[dict | None, BaseException | None]:
    """Run the `rlhf-sweep` flow on the checked plans; returns (sweep record, the error that failed it). A failed
    sweep's record is read back from the store (`sweeps/<id>/sweep.json`, when it is this flow run's)."""
    with _prefect_session(cfg, name, echo) as folder:
        from .sweep import rlhf_sweep

        state = rlhf_sweep.with_options(flow_run_name=name)(config=cfg, grid=axes, until=until,
                                                             variant_plans=sp.plans, run_folder=str(folder),
                                                             return_state=True)
    if state.is_completed():
        return state.result(), None
    try:
        record = store.read_json(f"{sweep_loop.SWEEPS_PREFIX}/{sweep_id(cfg, axes, until)}/sweep.json")
    except (FileNotFoundError, ValueError):
        record = None
    if record is not None and record.get("run_id") != str(state.state_details.flow_run_id):
        record = None  # an earlier run's
    return record, _state_error(state, name)
