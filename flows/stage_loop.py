"""The stage loop shared by the `rlhf-pipeline` flow and `rlhf run --no-prefect`, and what a run leaves behind: run
names, the per-stage summary entry, the run record (`runs/<run id>.json`) and the retry policy of a stage job.
Importing this module never imports Prefect."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhf_tasks.config import ExecutionConfig, PipelineConfig, load_config
from rlhf_tasks.config.methods import pipeline_stages
from rlhf_tasks.errors import UserError
from rlhf_tasks.stages import STAGES, StagePlan, StageSpec, _flatten, make_spec
from rlhf_tasks.store import ArtifactStore, canonical_json, compute_key

RUNS_PREFIX = "runs"
_NAME_SECTIONS = ("method", "models", *STAGES)  # what shapes results: the method, models, one section per stage


# Prefect's own names for a run nobody named: the server's `generate_slug(2)` and the UI form's prefilled random
# name are both two lowercase words, e.g. `brave-otter`.
_GENERATED_NAME = re.compile(r"[a-z]+-[a-z]+")


def config_hash(cfg: PipelineConfig, until: str | None = None) -> str:
    """Short hash of the whole config and the last stage (default: the method's last): two runs that differ in
    anything differ in it."""
    until = until or pipeline_stages(cfg)[-1]
    return compute_key({"config": cfg.model_dump(mode="json", by_alias=True), "until": until})[:6]


def looks_generated(name: str | None) -> bool:
    """True for a run name Prefect made up (`_GENERATED_NAME`); a name a person typed is anything else."""
    return not name or _GENERATED_NAME.fullmatch(name) is not None


def run_name(cfg: PipelineConfig, until: str | None = None) -> str:
    """`<experiment>-<what differs from the default preset>[-until-<stage>]-<hash>`, e.g.
    `demo-kl_coef0.05-1a2b3c` or `demo-kl_coef0.05-until-reward-4d5e6f`: the hash covers the whole config and
    `until` (a stage before the method's last one is named, the default is not)."""
    base = _flatten({k: v for k, v in load_config(None).model_dump(mode="json", by_alias=True).items()
                     if k in _NAME_SECTIONS})
    mine = _flatten({k: v for k, v in cfg.model_dump(mode="json", by_alias=True).items() if k in _NAME_SECTIONS})
    diffs = [k for k in sorted(set(base) | set(mine)) if base.get(k) != mine.get(k)]
    parts = [cfg.experiment]
    for k in diffs[:2]:
        leaf = re.split(r"[.\]\[]", k.rstrip("]"))[-1]
        value = mine.get(k)
        parts.append(f"{leaf}{'' if value is None else canonical_json(value).strip(chr(34))}")
    if len(diffs) > 2:
        parts.append(f"+{len(diffs) - 2}")
    if until is not None and until != pipeline_stages(cfg)[-1]:
        parts.append(f"until-{until}")
    parts.append(config_hash(cfg, until))
    return re.sub(r"[^A-Za-z0-9._+:-]+", "_", "-".join(parts))[:120]


def stage_entry(store: ArtifactStore, p: StagePlan, status: str, wall_s: float) -> dict[str, Any]:
    """Contract 3, one stage: status (cached | ran | failed), artifact URI, wall seconds, metrics (manifest)."""
    metrics: dict = {}
    if status != "failed":
        try:
            m = store.read_manifest(p.stage, p.key)
            metrics = dict(m.metrics) if m is not None else {}
        except Exception:  # a corrupt manifest is reported by the next plan, not here
            metrics = {}
    return {"status": status, "uri": p.uri, "wall_s": round(wall_s, 3), "metrics": metrics, "key": p.key}


@dataclass
class RunResult:
    """How a run ended. `stages`: one summary entry per stage reached, in pipeline order (a failed stage is the
    last, status `failed`); `error`: the exception that stopped the run (None when every stage completed);
    `record`: the run record as saved in the store (None when it could not be saved or read back)."""

    stages: dict[str, dict] = field(default_factory=dict)
    error: BaseException | None = None
    record: dict | None = None


def run_record(run_id: str, name: str, cfg: PipelineConfig, store: ArtifactStore, until: str, started: float,
               stages: dict[str, dict], status: str, error: str | None = None, orchestrator: str = "prefect") -> dict:
    """What `runs/<run id>.json` in the store holds (and `rlhf run --summary-json` writes)."""
    return {
        "run_id": run_id,
        "flow_run_name": name,
        "experiment": cfg.experiment,
        "status": status,
        "error": error,
        "until": until,
        "store": store.url,
        "orchestrator": orchestrator,
        "started": started,
        "wall_s": round(time.time() - started, 3),
        "stages": stages,
        "eval_uri": stages.get("eval", {}).get("uri") if stages.get("eval", {}).get("status") != "failed" else None,
        "config": cfg.model_dump(mode="json", by_alias=True),
    }


def save_run_record(store: ArtifactStore, record: dict) -> str:
    return store.write_json(f"{RUNS_PREFIX}/{record['run_id']}.json", record)


def read_run_record(store: ArtifactStore, run_id: str) -> dict | None:
    """The saved record of run `run_id`, or None when there is none (the run died before saving it)."""
    try:
        return store.read_json(f"{RUNS_PREFIX}/{run_id}.json")
    except (FileNotFoundError, ValueError):
        return None


def finish_run(result: RunResult, store: ArtifactStore, *, run_id: str, name: str, cfg: PipelineConfig,
               until: str, started: float, orchestrator: str) -> RunResult:
    """Save the run record of a finished stage loop (completed or failed) and attach it to the result. A record
    the store cannot take (a full disk, an unreachable bucket) fails a completed run; a failed run keeps its own
    error, the first cause."""
    status = "completed" if result.error is None else "failed"
    error = None if result.error is None else str(result.error)
    record = run_record(run_id, name, cfg, store, until, started, result.stages, status, error, orchestrator)
    try:
        save_run_record(store, record)
    except OSError as e:
        if result.error is None:
            result.error = OSError(e.errno, f"run record {RUNS_PREFIX}/{run_id}.json not saved: {e.strerror or e}")
        return result
    result.record = record
    return result


def run_dir(cfg: PipelineConfig, name: str, run_id: str) -> Path:
    """The run's local scratch folder `<runs_dir>/<run name>-<run id>`: the run log, and one folder per stage job.
    The run id makes it this run's own: two runs of one config (on one store or on two) never share one."""
    return Path(cfg.execution.runs_dir).expanduser().resolve() / f"{name}-{run_id[-8:]}"


def spec_for(cfg: PipelineConfig, store: ArtifactStore, p: StagePlan, folder: Path) -> StageSpec:
    """The spec of `p`'s job, its scratch in `<folder>/<stage>` (folder: the run's `run_dir`)."""
    return make_spec(cfg, store, p, folder / p.stage)


def run_stages(store: ArtifactStore, plans: list[StagePlan],
               run_one: Callable[[StagePlan, bool, dict[str, str]], tuple[str, dict]],
               echo: Callable[[str], None]) -> RunResult:
    """The stage loop. For each stage in order: re-check the store (truth), call
    `run_one(plan, cached_now, upstream_uris) -> (uri, extra)`, time it, and build the summary entry. The first
    exception (a failed stage, Ctrl-C) ends the loop: its stage's entry says `failed` and the result carries it."""
    result = RunResult()
    uris: dict[str, str] = {}
    for p in plans:
        cached_now = store.exists(p.stage, p.key)
        echo(f"{p.stage}: cached ({p.key[:12]})" if cached_now else f"{p.stage}: running ({p.reason})")
        t0 = time.monotonic()
        try:
            uri, extra = run_one(p, cached_now, {n: uris[n] for n in p.input_uris})
        except BaseException as e:
            result.stages[p.stage] = stage_entry(store, p, "failed", time.monotonic() - t0)
            result.error = e
            return result
        wall = time.monotonic() - t0
        uris[p.stage] = uri
        result.stages[p.stage] = stage_entry(store, p, "cached" if cached_now else "ran", wall) | extra
        if not cached_now:
            echo(f"{p.stage}: ran in {wall:.1f} s -> {uri}")
    return result


# ---- the retry policy of a stage job (the same with and without Prefect) ------------------------------------
def retry_delays(execution: ExecutionConfig) -> list[float]:
    """Seconds to wait before retry 1, 2, ...: `retry_delay_s`, doubling each time."""
    return [execution.retry_delay_s * 2**i for i in range(execution.retries)]


def is_retryable(error: BaseException) -> bool:
    """A failed job is retried (it resumes from its last checkpoint); bad input found inside a job is not: the
    same input fails the same way."""
    return isinstance(error, Exception) and not isinstance(error, UserError)


def retry_message(stage: str, attempt: int, error: BaseException, delay_s: float) -> str:
    """The line that announces a retry on the console and in the stage log."""
    text = str(getattr(error, "detail", None) or error).strip()  # StageFailed.detail: without "stage 'x' failed"
    first = text.splitlines()[0] if text else type(error).__name__
    return f"{stage}: attempt {attempt} failed ({first}); retrying in {delay_s:g} s"


def announce_retry(spec: StageSpec, line: str, echo: Callable[[str], None]) -> None:
    """Tell the user (echo) and the stage log (`<run_dir>/<stage>.log`, appended to by every attempt)."""
    echo(line)
    if spec.run_dir:
        log = Path(spec.run_dir) / f"{spec.stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"[retry] {line}\n")


def launch_with_retries(spec: StageSpec, execution: ExecutionConfig, launch: Callable[[], str],
                        echo: Callable[[str], None]) -> str:
    """`launch()` until it returns, retrying per `execution` what `is_retryable` allows (the --no-prefect path;
    the flow gets the same policy from Prefect's task retries)."""
    delays = retry_delays(execution)
    attempt = 1
    while True:
        try:
            return launch()
        except Exception as e:
            if attempt > len(delays) or not is_retryable(e):
                raise
            announce_retry(spec, retry_message(spec.stage, attempt, e, delays[attempt - 1]), echo)
            time.sleep(delays[attempt - 1])
            attempt += 1
