"""The two ways `rlhf run` (rlhf_tasks/cli.py) executes a plan it has computed and checked: as the `rlhf-pipeline`
flow (ephemeral Prefect API unless PREFECT_API_URL points at a server) or as local subprocesses without Prefect.
Both return a RunResult (summary entries, the error that stopped the run, the saved run record); neither prints
the result. Nothing here imports the CLI."""
from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from rlhf_tasks.config import PipelineConfig
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.stages import StagePlan
from rlhf_tasks.store import ArtifactStore

from . import ephemeral, observe
from .stage_loop import RunResult, finish_run, launch_with_retries, read_run_record, run_dir, run_stages, spec_for


def run_without_prefect(cfg: PipelineConfig, store: ArtifactStore, plans: list[StagePlan], name: str,
                        echo: Callable[[str], None]) -> RunResult:
    """The same stage loop, cache rule (the store) and retry policy, with the jobs as local subprocesses."""
    from .runner import launch_local

    if cfg.execution.work_pool:
        raise ConfigError("execution.work_pool needs Prefect (run without --no-prefect)")
    run_id = f"local-{uuid.uuid4()}"
    folder = run_dir(cfg, name, run_id)
    started = time.time()

    def run_one(p: StagePlan, cached_now: bool, upstream: dict[str, str]) -> tuple[str, dict]:
        if cached_now:
            return p.uri, {}
        spec = spec_for(cfg, store, p, folder)
        log = observe.StageLog(p.stage, spec.run_dir)
        return launch_with_retries(spec, cfg.execution, lambda: launch_local(spec, cfg.execution, log), echo), {}

    result = run_stages(store, plans, run_one, echo)
    return finish_run(result, store, run_id=run_id, name=name, cfg=cfg, until=plans[-1].stage, started=started,
                      orchestrator="none")


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


def run_with_prefect(cfg: PipelineConfig, store: ArtifactStore, plans: list[StagePlan], name: str,
                     echo: Callable[[str], None]) -> RunResult:
    """Run the flow on `plans` (it does not plan again). The flow saves the run record in the store whether it
    completes or fails; a failed run's record is read back from there by the flow run's id."""
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
    from .pipeline import rlhf_pipeline

    observe.set_console(echo)
    try:
        with api, _prefect_records_to(log_path):
            state = rlhf_pipeline.with_options(flow_run_name=name)(config=cfg, until=plans[-1].stage,
                                                                     stage_plans=plans, run_folder=str(folder),
                                                                     return_state=True)
    finally:
        observe.set_console(None)
    if state.is_completed():
        record = state.result()
        return RunResult(stages=record["stages"], record=record)
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):  # a state without its exception (e.g. cancelled from the UI)
        error = RuntimeError(f"flow run {name} ended {state.name}: {state.message or 'no message'}")
    record = read_run_record(store, str(state.state_details.flow_run_id))
    return RunResult(stages=(record or {}).get("stages", {}), error=error, record=record)
