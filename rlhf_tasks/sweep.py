"""Sweeps: one plan over every variant of a grid (`rlhf sweep --grid ppo.kl_coef=0.05,0.1`, the `rlhf-sweep` flow).

A variant is the base config with one value of every grid axis. Planning every variant with the one key rule
(`stages.plan`) makes the sharing fall out of content addressing: a stage no axis changes has the same key in every
variant, so the sweep's graph (`SweepPlan.nodes`) holds it once and it runs once; a value added to the grid later
plans to cached stages everywhere but in its own variant. Nothing here imports Prefect or runs a job.

Bad grid input raises a ConfigError whose one line names the grid argument (`--grid ppo.klcoef=0.1,0.2: ...`),
before the store is written.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import re
from dataclasses import dataclass
from typing import Any

from .config import PipelineConfig
from .config.grid import GridAxis
from .config.pipeline import DOTTED_KEY, set_dotted, config_from_dict, parse_value
from .errors import ConfigError
from .stages import StagePlan
from .store import ArtifactStore, canonical_json, compute_key

GRID_FORMAT = "KEY=V1,V2,... e.g. ppo.kl_coef=0.05,0.1"
SHARED_SECTIONS = ("store",)  # one store per sweep: the variants' stages share it


def split_values(raw: str) -> list[str]:
    """`0.05,0.1` -> ["0.05", "0.1"]; commas inside [...] or {...} belong to the value (`[1,2],[3]`)."""
    parts, depth, current = [], 0, ""
    for ch in raw:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        current += ch
    return [*parts, current]


def parse_grid_arg(item: str) -> GridAxis:
    """One `--grid KEY=V1,V2` argument (values parsed as `--set` parses them); `check_grid` checks the axis."""
    if "=" not in item:
        raise ConfigError(f"--grid {item}: expected {GRID_FORMAT}")
    key, raw = item.split("=", 1)
    texts = split_values(raw) if raw.strip() else []
    if any(not t.strip() for t in texts):
        raise ConfigError(f"--grid {item}: an empty value (expected {GRID_FORMAT})")
    return GridAxis.model_construct(key=key.strip(), values=[parse_value(t) for t in texts])


def grid_labels(axes: list[GridAxis], cli_items: list[str] | None = None) -> list[str]:
    """How errors name each axis: the `--grid` argument as typed, else `grid[i] (key)` (the flow parameter)."""
    if cli_items is not None:
        return [f"--grid {item}" for item in cli_items]
    return [f"grid[{i}] ({a.key})" for i, a in enumerate(axes)]


def check_grid(axes: list[GridAxis], labels: list[str]) -> None:
    """Axes a sweep can run: at least one; each a dotted key outside the shared sections, given once, with at least
    one value and no value twice."""
    if not axes:
        raise ConfigError(f"grid: no axis (expected --grid {GRID_FORMAT})")
    seen: dict[str, str] = {}
    for axis, label in zip(axes, labels):
        if not DOTTED_KEY.fullmatch(axis.key):
            raise ConfigError(f"{label}: bad key {axis.key!r} (expected {GRID_FORMAT})")
        if axis.key.split(".")[0] in SHARED_SECTIONS:
            raise ConfigError(f"{label}: {axis.key} cannot vary in a sweep (all variants share one store)")
        if axis.key in seen:
            raise ConfigError(f"{label}: {axis.key} is already an axis ({seen[axis.key]})")
        seen[axis.key] = label
        if not axis.values:
            raise ConfigError(f"{label}: no values (expected {GRID_FORMAT})")
        texts = [canonical_json(v) for v in axis.values]
        twice = next((v for v, t in zip(axis.values, texts) if texts.count(t) > 1), None)
        if twice is not None:
            raise ConfigError(f"{label}: value {twice!r} given twice")


@dataclass
class Variant:
    """One point of the grid: `assignment` {dotted key: value} applied to the base config gives `cfg`."""

    name: str  # `kl_coef=0.05` (`,`-joined when there are several axes)
    assignment: dict[str, Any]
    cfg: PipelineConfig

    @property
    def slug(self) -> str:
        """The name as a folder / run-name part."""
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", self.name.replace("=", "")).strip("_")[:80] or "variant"


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each key (`kl_coef`), or the whole key where two axes share a last part."""
    leaf = {k: k.rsplit(".", 1)[-1] for k in keys}
    return {k: leaf[k] if list(leaf.values()).count(leaf[k]) == 1 else k for k in keys}


def expand(base: PipelineConfig, axes: list[GridAxis], labels: list[str]) -> list[Variant]:
    """Every combination of the axes' values on `base`, in grid order (the first axis varies slowest). Each value
    is first checked alone (the error names its axis), then each combination (the error names every axis)."""
    check_grid(axes, labels)
    tree = base.model_dump(mode="json", by_alias=True)
    for axis, label in zip(axes, labels):
        for value in axis.values:
            one = copy.deepcopy(tree)
            _set_in(one, axis.key, value, label)
            config_from_dict(one, origin=label)
    names = _short_names([a.key for a in axes])
    variants = []
    for combo in itertools.product(*(a.values for a in axes)):
        assignment = {a.key: v for a, v in zip(axes, combo)}
        one = copy.deepcopy(tree)
        for key, value in assignment.items():
            _set_in(one, key, value, " ".join(labels))
        cfg = config_from_dict(one, origin=" ".join(labels))
        name = ",".join(f"{names[k]}={canonical_json(v).strip(chr(34))}" for k, v in assignment.items())
        variants.append(Variant(name, assignment, cfg))
    return variants


def _set_in(tree: dict, key: str, value: Any, label: str) -> None:
    try:
        set_dotted(tree, key, value)
    except ConfigError as e:  # `--set a.b: a is not a section`, said of the grid argument
        raise ConfigError(f"{label}: {str(e).split(': ', 1)[-1]}") from None


@dataclass
class SweepPlan:
    """The plan of every variant (`plans[i]` is variants[i]'s, as `rlhf plan` would show it alone) and the graph
    they make together: `nodes`, one StagePlan per distinct artifact."""

    variants: list[Variant]
    plans: list[list[StagePlan]]

    @property
    def nodes(self) -> list[StagePlan]:
        """Every distinct stage once, by position in the pipeline, then by the first variant using it (so all
        the variants' policy stages come before their evaluations)."""
        first: dict[str, tuple[int, int, StagePlan]] = {}
        for vi, plans in enumerate(self.plans):
            for pos, p in enumerate(plans):
                first.setdefault(p.uri, (pos, vi, p))
        return [p for _, _, p in sorted(first.values(), key=lambda t: (t[0], t[1]))]

    def users(self, uri: str) -> list[int]:
        """Indices of the variants whose plan has the stage of `uri`."""
        return [i for i, plans in enumerate(self.plans) if any(p.uri == uri for p in plans)]

    def variant_names(self, uri: str) -> str:
        users = self.users(uri)
        return "all" if len(users) == len(self.variants) else ", ".join(self.variants[i].name for i in users)


def plan_sweep(base: PipelineConfig, axes: list[GridAxis], labels: list[str],
               until: str) -> tuple[ArtifactStore, SweepPlan]:
    """Every variant checked and planned (`preflight.checked_plan`, the same checks as `rlhf run`), before
    anything is written or launched. The checks' notes are printed once (the variants share most of them)."""
    from . import preflight

    variants = expand(base, axes, labels)
    plans, notes, store = [], [], None
    for v in variants:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            store, p = preflight.checked_plan(v.cfg, until)
        plans.append(p)
        notes += [line for line in out.getvalue().splitlines() if line not in notes]
    check_axes_matter(axes, labels, variants, plans, until)
    for line in notes:
        print(line, flush=True)
    return store, SweepPlan(variants, plans)


def check_axes_matter(axes: list[GridAxis], labels: list[str], variants: list[Variant],
                      plans: list[list[StagePlan]], until: str) -> None:
    """Every axis with two or more values changes some variant's stages; else its variants are one run made twice
    and compared with itself: it sets a key no stage of the method reads up to `until` (`--grid dpo.beta=...` with
    method ppo, `--grid ppo.kl_coef=...` with `--until reward`). An axis that matters for some values of another
    axis only (`dpo.beta` beside `method=ppo,dpo`) is kept."""
    for axis, label in zip(axes, labels):
        if len(axis.values) < 2:
            continue
        stages_by_rest: dict[str, set[tuple[str, ...]]] = {}
        for v, p in zip(variants, plans):
            rest = canonical_json({k: x for k, x in v.assignment.items() if k != axis.key})
            stages_by_rest.setdefault(rest, set()).add(tuple(s.uri for s in p))
        if all(len(uris) == 1 for uris in stages_by_rest.values()):
            methods = sorted({v.cfg.method for v in variants})
            which = f"method{'s' if len(methods) > 1 else ''} {', '.join(methods)}"
            raise ConfigError(f"{label}: every value plans the same stages (no stage of {which} up to {until} "
                              f"reads {axis.key})")


def sweep_id(base: PipelineConfig, axes: list[GridAxis], until: str) -> str:
    """The sweep's folder name in the store (`sweeps/<id>/`): a hash of what shapes its results (the base config
    but placement and the store, the grid, `until`). The same grid again finds its report there; another value
    makes another sweep (its shared stages still cached)."""
    dump = base.model_dump(mode="json", by_alias=True)
    shaping = {k: v for k, v in dump.items() if k not in ("store", "execution")}
    shaping["execution.num_procs"] = dump["execution"]["num_procs"]  # it enters the training stages' keys
    return compute_key({"config": shaping, "grid": [[a.key, a.values] for a in axes], "until": until})[:12]
