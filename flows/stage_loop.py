"""The stage loop shared by the `rlhf-pipeline` flow and `rlhf run --no-prefect`, and what a run leaves behind: run
names, the per-stage summary entry, the run record (`runs/<run id>.json`) and the retry policy of a stage job.
Importing this module never imports Prefect."""
from __future__ import annotations

import concurrent.futures
import contextvars
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhf_tasks.config import ExecutionConfig, PipelineConfig, load_config
from rlhf_tasks.config.methods import pipeline_stages
from rlhf_tasks.errors import UserError
from rlhf_tasks.stages import STAGES, StagePlan, StageSpec, _flatten, make_spec
from rlhf_tasks.store import ArtifactStore, canonical_json, compute_key

RUNS_PREFIX = "runs"
_NAME_SECTIONS = ("method", "models", *STAGES, "dpo")  # what shapes results: the method, models, each stage's section


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


def flow_run_name(given: str | None, run_id: Any, make_name: Callable[[], str], fallback: str) -> str:
    """A flow run's name from the name it was given: a name a person gave (the UI form, `run_deployment`) stays;
    a generated one becomes `<make_name()>-<6 hex of the run id>`, unique and saying what the run is (`fallback`
    when `make_name` raises on bad parameters: the flow fails on them right after, with one line)."""
    if not looks_generated(given):
        return given
    try:
        name = make_name()
    except Exception:
        name = fallback
    return f"{name}-{str(run_id or uuid.uuid4()).replace('-', '')[:6]}"


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


def stage_entry(store: ArtifactStore, p: StagePlan, status: str, wall_s: float, started_at: float | None = None,
                finished_at: float | None = None) -> dict[str, Any]:
    """Contract 3, one stage: status (cached | ran | failed), artifact URI, wall seconds, when it started and
    finished (Unix seconds: parallel stages overlap), metrics (manifest)."""
    metrics: dict = {}
    if status != "failed":
        try:
            m = store.read_manifest(p.stage, p.key)
            metrics = dict(m.metrics) if m is not None else {}
        except Exception:  # a corrupt manifest is reported by the next plan, not here
            metrics = {}
    entry = {"status": status, "uri": p.uri, "wall_s": round(wall_s, 3), "metrics": metrics, "key": p.key}
    if started_at is not None:
        entry.update(started_at=round(started_at, 3), finished_at=round(finished_at or started_at, 3))
    return entry


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


def stage_slots(cfg: PipelineConfig) -> int:
    """How many stage jobs of a run of `cfg` may run at once (`execution.max_parallel_stages`, else what fits this
    machine: rlhf_tasks/devices.py)."""
    from rlhf_tasks import devices
    from rlhf_tasks.launch import job_accelerator

    return devices.stage_slots(cfg.execution, job_accelerator(cfg.execution), devices.visible_devices())


@dataclass
class GraphResult:
    """How a run of a stage graph ended: `entries` {artifact URI: summary entry} of every stage started (a failed
    one's status is `failed`), `errors` {URI: exception} of the failed ones in the order they failed, `skipped`
    the URIs never started (an input failed, or the run stopped), `interrupted` the Ctrl-C (or other
    BaseException) that stopped the run in the main thread, if one did."""

    entries: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    interrupted: BaseException | None = None

    @property
    def first_error(self) -> BaseException | None:
        return self.interrupted or next(iter(self.errors.values()), None)


def run_graph(store: ArtifactStore, plans: list[StagePlan],
              run_one: Callable[[StagePlan, bool, dict[str, str]], tuple[str, dict]],
              echo: Callable[[str], None], max_parallel: int = 1, keep_going: bool = False,
              label: Callable[[StagePlan], str] = lambda p: p.stage) -> GraphResult:
    """Run a graph of stages (one StagePlan per artifact; its `input_uris` name the stages it waits for), each as
    soon as its inputs are done, at most `max_parallel` at once, ready ones in `plans` order. Right before a stage
    starts the store is checked again (the truth); then `run_one(plan, cached_now, upstream_uris) -> (uri,
    extra)` runs it (in a worker thread with a copy of this context when `max_parallel` > 1: Prefect's run context
    comes along, as with Prefect's own thread pool) and its summary entry is built.

    A failure stops what depends on it; with `keep_going` everything else goes on (a sweep's other variants),
    else nothing new starts and the stages already running finish (their artifacts are kept). Ctrl-C (or any
    BaseException) stops the running jobs (launch.STOP_JOBS) and ends the run. `label(plan)` names a stage in
    the progress lines (a sweep adds the variant)."""
    from rlhf_tasks.launch import STOP_JOBS

    result = GraphResult()
    todo = list(plans)
    done: dict[str, str] = {}  # URI -> URI, for the stages that completed
    stop = threading.Event()

    def attempt(p: StagePlan) -> dict:
        cached_now = store.exists(p.stage, p.key)
        echo(f"{label(p)}: cached ({p.key[:12]})" if cached_now else f"{label(p)}: running ({p.reason})")
        started, t0 = time.time(), time.monotonic()
        try:
            uri, extra = run_one(p, cached_now, {n: done[u] for n, u in p.input_uris.items()})
            wall = time.monotonic() - t0
            done[p.uri] = uri
            result.entries[p.uri] = stage_entry(store, p, "cached" if cached_now else "ran", wall, started,
                                                time.time()) | extra
        except BaseException as e:
            result.entries[p.uri] = stage_entry(store, p, "failed", time.monotonic() - t0, started, time.time())
            result.errors[p.uri] = e
            if not isinstance(e, Exception):  # Ctrl-C inside a job's wait: stop everything
                stop.set()
            return result.entries[p.uri]
        if not cached_now:
            echo(f"{label(p)}: ran in {wall:.1f} s -> {uri}")
        return result.entries[p.uri]

    def ready() -> list[StagePlan]:
        """Drop the stages an input of which failed or was skipped; the rest whose inputs are all done."""
        dead = set(result.errors) | set(result.skipped)
        for p in [p for p in todo if any(u in dead for u in p.input_uris.values())]:
            todo.remove(p)
            result.skipped.append(p.uri)
        return [p for p in todo if all(u in done for u in p.input_uris.values())]

    def stopping() -> bool:
        return stop.is_set() or (bool(result.errors) and not keep_going)

    token = STOP_JOBS.set(stop)
    running: set[concurrent.futures.Future] = set()
    pool = concurrent.futures.ThreadPoolExecutor(max_parallel, "rlhf-stage") if max_parallel > 1 else None
    try:
        while True:
            batch = [] if stopping() else ready()
            if pool is None:  # one at a time in this thread: Ctrl-C reaches the job's wait directly
                if not batch:
                    break
                todo.remove(batch[0])
                attempt(batch[0])
                continue
            for p in batch[: max_parallel - len(running)]:
                todo.remove(p)
                running.add(pool.submit(contextvars.copy_context().run, attempt, p))
            if not running:
                break
            finished, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
    except BaseException as e:  # Ctrl-C in this thread: take the running jobs down, let them record how they ended
        stop.set()
        result.interrupted = e
        concurrent.futures.wait(running)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        STOP_JOBS.reset(token)
    result.skipped += [p.uri for p in todo]
    return result


def run_stages(store: ArtifactStore, plans: list[StagePlan],
               run_one: Callable[[StagePlan, bool, dict[str, str]], tuple[str, dict]],
               echo: Callable[[str], None], max_parallel: int = 1) -> RunResult:
    """One run's stages (run_graph): stages that do not depend on each other run at the same time, up to
    `max_parallel`. The first failure (a failed stage, Ctrl-C) ends the run: its stage's entry says `failed` and
    the result carries it; the summary holds the stages reached, in pipeline order."""
    graph = run_graph(store, plans, run_one, echo, max_parallel)
    return RunResult(stages={p.stage: graph.entries[p.uri] for p in plans if p.uri in graph.entries},
                     error=graph.first_error)


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
