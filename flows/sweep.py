"""The `rlhf-sweep` flow: every variant of a grid in one flow run, over the same cached stage tasks as
`rlhf-pipeline` (same task, same cache key = the stage key, same records in the store).

Stages the variants share (the same stage key: data, SFT and the reward model when only PPO settings vary) are
one task run; the variants' own stages run concurrently up to `execution.max_parallel_stages`; a failed variant
does not stop the others (the flow run ends Failed after the report is written). The comparison report is a
Prefect artifact and `sweeps/<sweep id>/sweep-report.md` in the store (flows/sweep_loop.py).
"""
from __future__ import annotations

import contextlib
import io
import time
import uuid
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed

from rlhf_tasks import sweep
from rlhf_tasks.config import PipelineConfig, load_config
from rlhf_tasks.config.grid import GridAxis
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.stages import StagePlan
from rlhf_tasks.store import ArtifactStore
from rlhf_tasks.store_links import artifact_link

from . import observe, stage_loop, storage, sweep_loop
from .pipeline import StageName, _config_param, _stage_runner

DEFAULT_GRID = [GridAxis(key="ppo.kl_coef", values=[0.05, 0.1])]


def _axes(grid) -> list[GridAxis]:
    return [a if isinstance(a, GridAxis) else GridAxis.model_validate(a) for a in grid or []]


def _sweep_run_name() -> str:
    """As the pipeline's (stage_loop.flow_run_name): a given name stays, a generated one becomes
    `<experiment>-sweep-<6 hex of the sweep id>-<6 hex of the run id>`."""
    def make_name() -> str:
        params = current_flow_run.parameters
        cfg = _config_param(params.get("config"), params.get("overrides"))
        return sweep_loop.sweep_name(cfg.experiment, sweep.sweep_id(cfg, _axes(params.get("grid")),
                                                                    params.get("until", "eval")))

    return stage_loop.flow_run_name(current_flow_run.name, current_flow_run.id, make_name, fallback="rlhf-sweep")


def report_where(store: ArtifactStore, sweep_id: str, result: sweep_loop.SweepResult) -> str:
    """Where the sweep's report is: a link a browser opens (presigned S3 GET, http store; store_links), else its
    URI in the store."""
    from rlhf_tasks.evaluation.sweep_report import REPORT_NAME

    try:
        link = artifact_link(store, sweep_loop.SWEEPS_PREFIX, sweep_id, REPORT_NAME)
    except Exception:  # noqa: BLE001 - a link is a convenience: the URI still says where the report is
        return str(result.report_uri)
    return f"{link.url} ({link.how} link)" if link.url else str(result.report_uri)


def publish_sweep_report(result: sweep_loop.SweepResult, report_dir: Path, experiment: str, where: str,
                         logger) -> None:
    """The report (plot inlined) as a markdown artifact and its table as a table artifact."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        from rlhf_tasks.evaluation.report import embed_plots
        from rlhf_tasks.evaluation.sweep_report import REPORT_NAME, variant_rows

        key = observe.artifact_key(experiment, "sweep")
        create_markdown_artifact(embed_plots((report_dir / REPORT_NAME).read_text(), report_dir),
                                 key=f"{key}-report", description=f"Sweep comparison report ({where})")
        create_table_artifact(variant_rows(result.record), key=f"{key}-table",
                              description="Every variant's evaluation against the shared SFT baseline")
    except Exception as e:  # observability must never fail the sweep
        logger.warning(f"sweep report not published as Prefect artifacts: {e}")


@flow(name="rlhf-sweep", flow_run_name=_sweep_run_name, log_prints=False)
def rlhf_sweep(config: PipelineConfig = load_config(None), grid: list[GridAxis] = DEFAULT_GRID,
               until: StageName = "eval", overrides: Optional[list[str]] = None,
               variant_plans: Optional[list[list[StagePlan]]] = None, run_folder: Optional[str] = None) -> dict:
    """Run every variant of a grid over the pipeline, sharing the stages they have in common, and compare them.

    Args:
        config: the base config (defaults to the tiny preset).
        grid: the axes: a dotted config key and its values each, e.g. key ppo.kl_coef, values [0.05, 0.1, 0.2];
            one variant per combination.
        until: the last stage of every variant.
        overrides: `rlhf sweep --set` items applied to the base config, e.g. ["ppo.ppo_epochs=2"].
        variant_plans: the checked plans `rlhf sweep` computed, one per variant in grid order (leave empty: the
            flow then checks the inputs and plans itself).
        run_folder: the local folder for this sweep's stage jobs (leave empty: `<runs_dir>/<sweep name>-<flow
            run id>`).
    """
    logger = get_run_logger()
    cfg = _config_param(config, overrides)
    axes = _axes(grid)
    labels = sweep.grid_labels(axes)
    started = time.time()
    run_id = str(current_flow_run.id or uuid.uuid4())
    sid = sweep.sweep_id(cfg, axes, until)
    name = current_flow_run.name or sweep_loop.sweep_name(cfg.experiment, sid)
    folder = Path(run_folder) if run_folder else stage_loop.run_dir(cfg, name, run_id)
    if variant_plans:
        if overrides:
            raise ConfigError("overrides: the given variant_plans were computed for the config as passed")
        variants = sweep.expand(cfg, axes, labels)
        if len(variant_plans) != len(variants):
            raise ConfigError(f"variant_plans: {len(variant_plans)} plans for {len(variants)} variants")
        store, sp = ArtifactStore.from_config(cfg.store), sweep.SweepPlan(variants, variant_plans)
    else:
        with contextlib.redirect_stdout(io.StringIO()) as out:  # the checks' notes go to the run log only
            store, sp = sweep.plan_sweep(cfg, axes, labels, until)
        for line in out.getvalue().splitlines():
            logger.info(line)
    for p in sp.nodes:
        logger.info(f"plan {p.stage} [{sp.variant_names(p.uri)}]: {'cached' if p.cached else 'will run'} - "
                    f"{p.reason} ({p.key})")
    result_storage = storage.result_storage_for(store)
    runners: dict[int, sweep_loop.RunOne] = {}

    def run_one_for(i: int) -> sweep_loop.RunOne:
        if i not in runners:
            v = sp.variants[i]
            runners[i] = _stage_runner(v.cfg, store, folder / v.slug, result_storage, logger)
        return runners[i]

    def echo(line: str) -> None:
        logger.info(line)
        observe.console(line)

    slots = stage_loop.stage_slots(cfg)
    logger.info(f"{len(sp.variants)} variants, {len(sp.nodes)} distinct stages, up to {slots} stage job(s) at once")
    graph = sweep_loop.run_sweep(store, sp, run_one_for, echo, slots)
    result = sweep_loop.finish_sweep(graph, store, sp, sweep_id=sid, run_id=run_id, name=name, grid=axes,
                                     until=until, started=started, max_parallel=slots, orchestrator="prefect",
                                     report_dir=folder / "report")
    where = None
    if result.record is not None:
        where = report_where(store, sid, result)
        publish_sweep_report(result, folder / "report", cfg.experiment, where, logger)
        logger.info(f"sweep report: {where}")
    error = sweep_loop.sweep_error(result, len(sp.variants))
    if error is not None:
        raise error  # the flow run fails (Prefect shows why); `rlhf sweep` reads the record from the store
    # As the pipeline's: the final state's message (the run header, Prefect's last log line) says where the
    # report is; the result is the record.
    return Completed(message=f"sweep report: {where}", data=result.record)
