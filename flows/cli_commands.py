"""`rlhf plan` and `rlhf run` (dispatched from rlhf_tasks/cli.py).

`plan` computes the stage keys and checks the store: it never imports Prefect and launches nothing.
`run` validates everything first (exit 2 on bad input, before any Prefect start or job launch), then runs the
`rlhf-pipeline` flow (ephemeral Prefect API unless PREFECT_API_URL points at a server) and prints the stage table.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

from rlhf_tasks.cli import load_selected_config, print_table
from rlhf_tasks.errors import ConfigError, StageFailed, UserError
from rlhf_tasks.stages import plan
from rlhf_tasks.store import ArtifactStore

from . import core, observe

_PREFERRED = ("win", "reward", "score", "kl", "acc", "loss", "rows", "steps")


def _say(line: str) -> None:
    print(line, flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def key_metrics(metrics: dict, limit: int = 4) -> str:
    """A few headline metrics: names mentioning win/reward/kl/acc/loss first, then the rest alphabetically."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    rank = lambda k: (next((i for i, w in enumerate(_PREFERRED) if w in k.lower()), len(_PREFERRED)), k)  # noqa: E731
    names = sorted(scalars, key=rank)[:limit]
    more = f" (+{len(scalars) - limit})" if len(scalars) > limit else ""
    return ", ".join(f"{k}={_fmt(scalars[k])}" for k in names) + more


def _selected(args):
    cfg = load_selected_config(args)
    store = ArtifactStore.from_config(cfg.store)
    return cfg, store


# ---- rlhf plan ------------------------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    cfg, store = _selected(args)
    as_json = getattr(args, "json", False)
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # keep stdout pure JSON
        core.validate_inputs(cfg)
        plans = plan(cfg, store, args.until)
    if as_json:
        _say(json.dumps([{"stage": p.stage, "status": "cached" if p.cached else "will-run", "key": p.key,
                          "uri": p.uri, "reason": p.reason, "inputs": p.input_uris} for p in plans], indent=1))
        return 0
    _say(f"plan for {core.run_name(cfg)} (store {store.url}):")
    print_table(("STAGE", "STATUS", "KEY", "REASON"),
                [(p.stage, "cached" if p.cached else "will-run", p.key, p.reason) for p in plans])
    return 0


# ---- rlhf run -------------------------------------------------------------------------------------------------
def _run_without_prefect(cfg, store, plans, name: str) -> dict:
    """The same stage loop and cache rule (the store) without Prefect: local subprocesses, retries with backoff."""
    from .runner import launch_local

    if cfg.execution.work_pool:
        raise ConfigError("execution.work_pool needs Prefect (run without --no-prefect)")
    run_id = f"local-{uuid.uuid4()}"
    started = time.time()

    def run_one(p, cached_now, upstream):
        if cached_now:
            return p.uri, {}
        spec = core.spec_for(cfg, store, p, name)
        log = observe.StageLog(p.stage, spec.run_dir)
        for attempt in range(cfg.execution.retries + 1):
            try:
                return launch_local(spec, cfg.execution, log), {}
            except StageFailed as e:
                if attempt == cfg.execution.retries:
                    raise
                delay = cfg.execution.retry_delay_s * 2**attempt
                _say(f"{p.stage}: attempt {attempt + 1} failed ({str(e).splitlines()[0]}); "
                     f"retrying in {delay:.0f} s")
                time.sleep(delay)

    try:
        stages = core.run_stages(cfg, store, plans, name, run_one, _say)
    except BaseException as e:
        e.run_record = core.run_record(run_id, name, cfg, store, plans[-1].stage, started,  # type: ignore
                                       getattr(e, "stages", {}), "failed", str(e), orchestrator="none")
        core.save_run_record(store, e.run_record)  # type: ignore[attr-defined]
        raise
    record = core.run_record(run_id, name, cfg, store, plans[-1].stage, started, stages, "completed",
                             orchestrator="none")
    core.save_run_record(store, record)
    return record


def _run_with_prefect(cfg, until: str, name: str) -> dict:
    # Keep the terminal for our table and progress lines; everything still goes to the Prefect run logs.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    if not os.environ.get("PREFECT_API_URL"):
        _say("prefect: temporary local API for this run (set PREFECT_API_URL to use a server)")
    from .pipeline import rlhf_pipeline

    observe.set_console(_say)
    try:
        return rlhf_pipeline.with_options(flow_run_name=name)(config=cfg, until=until)
    finally:
        observe.set_console(None)


def _write_summary(path: str | None, record: dict | None) -> None:
    if path and record is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1, default=str))  # stages in pipeline order


def cmd_run(args) -> int:
    cfg, store = _selected(args)
    # Everything that can be wrong with the input is found here, before Prefect starts or a job launches.
    core.validate_inputs(cfg)
    plans = plan(cfg, store, args.until)
    name = core.run_name(cfg)
    todo = [p.stage for p in plans if not p.cached]
    _say(f"run {name}: {len(plans) - len(todo)} cached, {len(todo)} to run ({', '.join(todo) or 'nothing'}); "
         f"store {store.url}")
    t0 = time.monotonic()
    try:
        if getattr(args, "no_prefect", False):
            record = _run_without_prefect(cfg, store, plans, name)
        else:
            record = _run_with_prefect(cfg, args.until, name)
    except BaseException as e:
        record = getattr(e, "run_record", None)
        if record is not None:
            _print_stage_table(record)
            _write_summary(args.summary_json, record)
        if isinstance(e, StageFailed):
            raise
        if isinstance(e, (KeyboardInterrupt, UserError)):
            raise
        # Anything else from the orchestration layer: report the failing stage as a StageFailed (exit 1).
        failed = [s for s, v in (record or {}).get("stages", {}).items() if v.get("status") == "failed"]
        if failed:
            raise StageFailed(failed[0], f"{type(e).__name__}: {e}") from e
        raise
    wall = time.monotonic() - t0
    _print_stage_table(record)
    n_ran = sum(1 for v in record["stages"].values() if v["status"] == "ran")
    _say(f"{record['flow_run_name']}: {n_ran} ran, {len(record['stages']) - n_ran} cached in {wall:.1f} s "
         f"(run id {record['run_id']})")
    _write_summary(args.summary_json, record)
    return 0


def _print_stage_table(record: dict) -> None:
    rows = [(stage, v["status"], f"{v['wall_s']:.1f}", key_metrics(v.get("metrics") or {}), v["uri"])
            for stage, v in record["stages"].items()]
    if rows:
        _say("")
        print_table(("STAGE", "STATUS", "WALL_S", "METRICS", "ARTIFACT"), rows)


if __name__ == "__main__":  # pragma: no cover
    from rlhf_tasks.cli import main

    sys.exit(main())
