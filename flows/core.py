"""Prefect-free pieces shared by the flow, `rlhf plan` and `rlhf run --no-prefect`: input validation, run names,
the per-stage summary entry and the run record. Importing this module never imports Prefect."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

from rlhf_tasks.config import PipelineConfig, load_config
from rlhf_tasks.stages import StagePlan, StageSpec, _flatten, make_spec
from rlhf_tasks.store import ArtifactStore, canonical_json, compute_key

RUNS_PREFIX = "runs"
_NAME_SECTIONS = ("models", "data", "sft", "reward", "ppo", "eval")


def validate_inputs(cfg: PipelineConfig) -> None:
    """Check the config's data sources before anything is launched (raises ConfigError/DataError -> exit 2)."""
    from rlhf_tasks.data.stage import validate_sources

    validate_sources(cfg)


def config_hash(cfg: PipelineConfig) -> str:
    """Short hash of everything that shapes the results (not placement, timeouts or the store)."""
    dump = cfg.model_dump(mode="json", by_alias=True)
    return compute_key({k: dump[k] for k in ("experiment", *_NAME_SECTIONS)})[:6]


def run_name(cfg: PipelineConfig) -> str:
    """`<experiment>-<what differs from the default preset>-<hash>`, e.g. `demo-kl_coef0.05-1a2b3c`."""
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
    parts.append(config_hash(cfg))
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


def stage_run_dir(cfg: PipelineConfig, name: str, stage: str) -> Path:
    return Path(cfg.execution.runs_dir).expanduser().resolve() / name / stage


def spec_for(cfg: PipelineConfig, store: ArtifactStore, p: StagePlan, name: str) -> StageSpec:
    return make_spec(cfg, store, p, stage_run_dir(cfg, name, p.stage))


def run_stages(cfg: PipelineConfig, store: ArtifactStore, plans: list[StagePlan], name: str,
               run_one: Callable[[StagePlan, bool, dict[str, str]], tuple[str, dict]],
               echo: Callable[[str], None]) -> dict[str, dict]:
    """The stage loop shared by the flow and --no-prefect. For each stage in order: re-check the store (truth),
    call `run_one(plan, cached_now, upstream_uris) -> (uri, extra)`, time it, and build the summary entry.
    On failure the entry says `failed` and the exception propagates with `.stages` attached."""
    from rlhf_tasks.stages import STAGE_DEFS

    stages: dict[str, dict] = {}
    uris: dict[str, str] = {}
    for p in plans:
        cached_now = store.exists(p.stage, p.key)
        echo(f"{p.stage}: cached ({p.key[:12]})" if cached_now else f"{p.stage}: running ({p.reason})")
        t0 = time.monotonic()
        try:
            uri, extra = run_one(p, cached_now, {n: uris[n] for n in STAGE_DEFS[p.stage].inputs})
        except BaseException as e:
            stages[p.stage] = stage_entry(store, p, "failed", time.monotonic() - t0)
            e.stages = stages  # type: ignore[attr-defined]
            raise
        wall = time.monotonic() - t0
        uris[p.stage] = uri
        stages[p.stage] = stage_entry(store, p, "cached" if cached_now else "ran", wall) | extra
        if not cached_now:
            echo(f"{p.stage}: ran in {wall:.1f} s -> {uri}")
    return stages
