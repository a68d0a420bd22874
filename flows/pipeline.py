"""The `rlhf-pipeline` flow: data -> sft -> reward -> ppo -> eval, one Prefect task per stage, thin over rlhf_tasks.
Stages that do not depend on each other (SFT and the reward model) are concurrent task runs, up to
`execution.max_parallel_stages` (flows/stage_loop.py:run_graph).

Caching (the whole rule; infra/README.md has the deployment side):
- The cache key of a stage task IS the stage key from `rlhf_tasks.stages.plan()` (`StageKeyPolicy`); nothing about
  the flow run, the task source or Prefect's database enters it.
- The cached result is the artifact URI (JSON serializer, no pickles in a shared store), kept in the store itself
  (`<store>/_prefect/cache/`, see flows/storage.py), so any run on any machine pointing at the store sees it.
- The store is the source of truth: right before each stage the flow checks that the artifact exists and verifies;
  if it does not, the task runs with `refresh_cache=True` (the stale record is ignored and overwritten).
"""
from __future__ import annotations

import contextlib
import io
import time
import uuid
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed

from rlhf_tasks import preflight
from rlhf_tasks.config import ExecutionConfig, PipelineConfig, config_from_dict, load_config
from rlhf_tasks.errors import ConfigError, StageFailed
from rlhf_tasks.stages import ALL_STAGES, StagePlan, StageSpec
from rlhf_tasks.store import ArtifactStore

from . import observe, runner, stage_loop, storage

StageName = Literal[ALL_STAGES]  # the same as Literal["data", "sft", ...]: the UI's choices come from rlhf_tasks.stages
RECORD_FORMAT = "v1"  # bump to invalidate every cache record (the artifacts stay)


@dataclass
class StageKeyPolicy(CachePolicy):
    """Cache key = the stage key carried by the task's `spec` (computed by `plan()`, the one key rule)."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        spec = inputs.get("spec") or {}
        stage, key = spec.get("stage"), spec.get("key")
        if not stage or not key:
            return None
        return f"rlhf-{RECORD_FORMAT}-{stage}-{key}"


STAGE_KEY_POLICY = StageKeyPolicy()


@task(name="stage", cache_policy=STAGE_KEY_POLICY, persist_result=True, result_serializer="json")
def stage_task(spec: dict, inputs: dict[str, str]) -> str:
    """Run one stage job (unless its artifact already exists) and return its artifact URI.

    `inputs` are the upstream tasks' results (URIs), which is also how Prefect draws the stage graph."""
    logger = get_run_logger()
    s = StageSpec(**spec)
    if inputs != s.inputs:
        raise StageFailed(s.stage, f"upstream URIs {inputs} differ from the plan's {s.inputs}")
    store = s.open_store()
    if store.exists(s.stage, s.key):  # made meanwhile by another run, or cached without a Prefect record
        logger.info(f"{s.stage}: artifact {s.output_uri} already in the store")
        return s.output_uri
    execution = ExecutionConfig.model_validate(s.config["execution"])
    logger.info(f"{s.stage}: launching job (key {s.key})")
    # A failure raises StageFailed naming the log file; Prefect retries it (the job resumes from its checkpoint).
    uri = runner.launch(s, execution, observe.StageLog(s.stage, s.run_dir, logger,
                                                       experiment=s.config.get("experiment", "rlhf")))
    if uri != s.output_uri:
        raise StageFailed(s.stage, f"job returned {uri}, expected {s.output_uri}")
    return uri


def _retry_policy(spec: StageSpec, execution: ExecutionConfig, logger):
    """The stage task's `retry_condition_fn` (Prefect calls it after a failed attempt while retries remain): bad
    input found inside the job is not retried; any other failure is, announced on the console, in the stage log
    and in the run log, exactly as `rlhf run --no-prefect` does it (stage_loop.launch_with_retries)."""
    delays = stage_loop.retry_delays(execution)
    failed_attempts = 0

    def should_retry(task, task_run, state) -> bool:
        nonlocal failed_attempts
        error = state.result(raise_on_failure=False)  # the exception of the failed attempt
        if isinstance(error, BaseException) and not stage_loop.is_retryable(error):
            return False
        failed_attempts += 1
        delay = delays[min(failed_attempts, len(delays)) - 1]
        line = stage_loop.retry_message(spec.stage, failed_attempts, error, delay)
        logger.info(line)
        stage_loop.announce_retry(spec, line, observe.console)
        return True

    return should_retry


def _config_param(value: Any, overrides: list[str] | None = None) -> PipelineConfig:
    """The flow's `config` parameter (model, dict or None = the default preset) with `--set`-style overrides."""
    if isinstance(value, PipelineConfig) and not overrides:
        return value
    if value is None:
        value = load_config(None)
    tree = value.model_dump(mode="json", by_alias=True) if isinstance(value, PipelineConfig) else dict(value)
    return config_from_dict(tree, origin="parameters.config", overrides=overrides, overrides_origin="overrides")


def _flow_run_name() -> str:
    """The run's name (Prefect calls this when the flow starts and renames the run to it): a given one stays, a
    generated one becomes `<run_name>-<6 hex of the run id>` (stage_loop.flow_run_name)."""
    def make_name() -> str:
        params = current_flow_run.parameters
        return stage_loop.run_name(_config_param(params.get("config"), params.get("overrides")), params.get("until"))

    return stage_loop.flow_run_name(current_flow_run.name, current_flow_run.id, make_name, fallback="rlhf")


def _stage_runner(cfg: PipelineConfig, store: ArtifactStore, folder: Path, result_storage, logger):
    def run_one(p: StagePlan, cached_now: bool, upstream: dict[str, str]) -> tuple[str, dict]:
        spec = stage_loop.spec_for(cfg, store, p, folder)
        t = stage_task.with_options(
            name=f"stage-{p.stage}", task_run_name=p.stage, refresh_cache=not cached_now,
            retries=cfg.execution.retries, retry_delay_seconds=stage_loop.retry_delays(cfg.execution),
            retry_condition_fn=_retry_policy(spec, cfg.execution, logger), result_storage=result_storage)
        state = t(spec=asdict(spec), inputs=upstream, return_state=True)
        uri = state.result()  # raises the stage's exception when it failed
        if uri != p.uri:  # a record from elsewhere can only hold this URI (content addressing); be strict anyway
            logger.warning(f"{p.stage}: cache record held {uri!r}, expected {p.uri!r}; using the store's")
            uri = p.uri
        status = "cached" if cached_now else "ran"
        entry = stage_loop.stage_entry(store, p, status, 0.0)
        on_task = dict(experiment=cfg.experiment, task_run_id=state.state_details.task_run_id)  # ran or cached
        observe.publish_stage_artifacts(store, p.stage, p.key, uri, status, entry["metrics"], logger, **on_task)
        if p.stage == "eval":
            observe.publish_eval_report(store, uri, cfg.experiment, logger, task_run_id=on_task["task_run_id"])
        logger.info(f"{p.stage}: {status} ({state.name}) {uri}")
        return uri, {"prefect_state": state.name}

    return run_one


@flow(name="rlhf-pipeline", flow_run_name=_flow_run_name, log_prints=False)
def rlhf_pipeline(config: PipelineConfig = load_config(None), until: StageName = "eval",
                  overrides: Optional[list[str]] = None, stage_plans: Optional[list[StagePlan]] = None,
                  run_folder: Optional[str] = None) -> dict:
    """DeepSpeed-Chat's recipe as cached stages: data blend, SFT, reward model, PPO, evaluation.

    Stages whose artifact already exists in the store (same config slice, inputs and code) are reused.

    Args:
        config: the pipeline config, one section per stage (defaults to the tiny preset).
        until: the last stage to run (`rlhf run --until`): `data`, `sft`, `reward`, the method's policy stage
            (`ppo`, `grpo`, `rloo` or `dpo`) or `eval` (the default, the whole pipeline); the stages after it are
            not run.
        overrides: changes to `config`, one `KEY=VALUE` item each, as `rlhf run --set` takes them: a dotted key and
            a YAML value, e.g. `ppo.kl_coef=0.05`, `sft.max_steps=20`, `execution.work_pool=gpu`. Empty: `config`
            as it is. A wrong key is reported as `overrides: <key>: unknown key`.
        stage_plans: the checked plan `rlhf run` computed for this config (leave empty: the flow then checks the
            inputs and plans itself).
        run_folder: the local folder for this run's stage jobs (leave empty: `<runs_dir>/<run name>-<flow run
            id>`); `rlhf run` passes the folder its run log is in.
    """
    logger = get_run_logger()
    cfg = _config_param(config, overrides)
    started = time.time()
    run_id = str(current_flow_run.id or uuid.uuid4())
    name = current_flow_run.name or stage_loop.run_name(cfg, until)
    folder = Path(run_folder) if run_folder else stage_loop.run_dir(cfg, name, run_id)
    if stage_plans:
        store, plans = ArtifactStore.from_config(cfg.store), stage_plans
        if overrides:
            raise ConfigError("overrides: the given stage_plans were computed for the config as passed; apply "
                              "overrides before planning (rlhf run --set)")
        if plans[-1].stage != until:
            raise ConfigError(f"until: {until!r} but the given plan ends at {plans[-1].stage!r}")
    else:
        with contextlib.redirect_stdout(io.StringIO()) as out:  # the checks' notes go to the run log only
            store, plans = preflight.checked_plan(cfg, until)
        for line in out.getvalue().splitlines():
            logger.info(line)
    for p in plans:
        logger.info(f"plan {p.stage}: {'cached' if p.cached else 'will run'} - {p.reason} ({p.key})")
    result_storage = storage.result_storage_for(store)

    def echo(line: str) -> None:
        logger.info(line)
        observe.console(line)

    slots = stage_loop.stage_slots(cfg)
    logger.info(f"up to {slots} stage job(s) at once (execution.max_parallel_stages)")
    result = stage_loop.run_stages(store, plans, _stage_runner(cfg, store, folder, result_storage, logger),
                                   echo, max_parallel=slots)
    stage_loop.finish_run(result, store, run_id=run_id, name=name, cfg=cfg, until=until, started=started,
                          orchestrator="prefect")
    if result.error is not None:
        raise result.error  # the flow run fails (Prefect shows why); `rlhf run` reads the record from the store
    logger.info(f"run record: {store.url}/{stage_loop.RUNS_PREFIX}/{run_id}.json")
    report = observe.report_line(store, result.record, cfg.experiment)
    logger.info(report)
    # The final state's message is the report line: the run header shows it, and Prefect's own last log line
    # says "Finished in state Completed('report: ...')". The result is the record, as when returned plainly.
    return Completed(message=report, data=result.record)
