"""The `train-stage` flow: one training stage job on a (GPU) worker, submitted by the pipeline with `run_deployment`
when `execution.work_pool` is set. It gets the stage spec (contract 1) and the execution settings, runs the job with
the same launcher as local runs, and commits the artifact to the store; the pipeline reads the URI back from there.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from rlhf_tasks.config import ExecutionConfig
from rlhf_tasks.errors import JobInputError
from rlhf_tasks.stages import StageSpec

from . import observe


@flow(name="train-stage", log_prints=False)
def train_stage(spec: dict, execution: dict | None = None) -> str:
    """Run one stage job here and return its artifact URI (the store holds the artifact). A job that finds bad
    input (exit 2) ends the flow run Failed with a message starting "bad input: " (runner.pool_failure).

    Args:
        spec: the stage spec the pipeline computed (`rlhf_tasks.stages.StageSpec` as a dict: stage, key, config,
            input and output URIs, store settings); the pipeline submits it, nobody types it.
        execution: the `execution` config section for the job (processes, launcher, timeout); empty: the one in
            `spec`.
    """
    from .runner import BAD_INPUT_PREFIX, launch_local

    logger = get_run_logger()
    s = StageSpec(**spec)
    ex = ExecutionConfig.model_validate(execution or s.config.get("execution", {}))
    store = s.open_store()
    if store.exists(s.stage, s.key):
        logger.info(f"{s.stage}: {s.output_uri} already in the store")
        return s.output_uri
    # The submitting machine's scratch path means nothing here: use a local one.
    root = Path(os.environ.get("RLHF_RUNS_DIR") or Path(tempfile.gettempdir()) / "rlhf-runs")
    s.run_dir = str(root / f"{s.stage}-{s.key}-{uuid.uuid4().hex[:8]}")  # this flow run's own folder
    logger.info(f"{s.stage}: launching job (key {s.key}, {ex.num_nodes}x{ex.num_procs} processes)")
    try:
        return launch_local(s, ex, observe.StageLog(s.stage, s.run_dir, logger,
                                                    experiment=s.config.get("experiment", "rlhf")))
    except JobInputError as e:  # the submitting pipeline reads this message: bad input is not retried
        logger.error(str(e))
        return Failed(message=f"{BAD_INPUT_PREFIX}{e}")
