"""Execution placement of one stage job: a local subprocess (the default) or a flow run of the `train-stage`
deployment on a work pool (`execution.work_pool`, training stages only). Either way the job writes its artifact to
the store and the caller gets the artifact URI back, never weights."""
from __future__ import annotations

from typing import Callable

from rlhf_tasks.config import ExecutionConfig
from rlhf_tasks.errors import JobInputError, StageFailed
from rlhf_tasks.stages import STAGE_DEFS, StageSpec

TRAINING_STAGES = tuple(s for s, d in STAGE_DEFS.items() if d.distributed)  # the DeepSpeed jobs


def launch_local(spec: StageSpec, execution: ExecutionConfig, log: Callable[[str], None]) -> str:
    """Run the stage job here (plain python, torchrun or the DeepSpeed launcher: the launcher decides). It owns the
    timeout and kills the job's whole process group on timeout, cancellation or our death."""
    from rlhf_tasks.launch import run_stage

    return run_stage(spec, execution, log=log)


def train_deployment_name(execution: ExecutionConfig) -> str:
    return execution.train_deployment or f"train-stage/{execution.work_pool}"


BAD_INPUT_PREFIX = "bad input: "  # how the train-stage flow says its job exited 2 (flows/train_stage.py)


def pool_failure(stage: str, run_label: str, state) -> Exception:
    """The error for a train-stage flow run that did not complete: its job's bad input (never retried) when the
    flow says so in its final state's message, else a StageFailed (retried)."""
    message = (state.message or "") if state is not None else ""
    if state is not None and state.is_failed() and message.startswith(BAD_INPUT_PREFIX):
        return JobInputError(message.removeprefix(BAD_INPUT_PREFIX))
    return StageFailed(stage, f"train-stage flow run {run_label} ended "
                              f"{state.name if state else 'without a state'}; see its logs in Prefect")


def launch_on_pool(spec: StageSpec, execution: ExecutionConfig, log: Callable[[str], None]) -> str:
    """Submit the stage as its own flow run of the train-stage deployment and wait for it. The URI comes back
    through the store: the job committed the artifact there, we only check that it exists."""
    from prefect.deployments import run_deployment

    name = train_deployment_name(execution)
    log(f"submitting {spec.stage} to deployment {name} (work pool {execution.work_pool})")
    params = {"spec": spec.__dict__ | {"run_dir": ""}, "execution": execution.model_dump(mode="json")}
    # Waits for the job: its own timeout (enforced by the launcher on the worker) plus an hour of queueing.
    run = run_deployment(name, parameters=params, job_variables=dict(execution.job_variables) or None,
                         flow_run_name=f"{spec.stage}-{spec.key[:10]}", timeout=execution.timeout_s + 3600,
                         as_subflow=True)
    state = run.state
    log(f"train-stage flow run {run.name} ({run.id}) ended {state.name if state else 'unknown'}")
    if state is None or not state.is_completed():
        raise pool_failure(spec.stage, f"{run.name} ({run.id})", state)
    store = spec.open_store()
    kind, key = store.parse_uri(spec.output_uri)
    if not store.exists(kind, key):
        raise StageFailed(spec.stage, f"train-stage flow run {run.name} completed but {spec.output_uri} "
                                      "does not verify in the store")
    return spec.output_uri


def launch(spec: StageSpec, execution: ExecutionConfig, log: Callable[[str], None]) -> str:
    if execution.work_pool and spec.stage in TRAINING_STAGES:
        return launch_on_pool(spec, execution, log)
    return launch_local(spec, execution, log)
