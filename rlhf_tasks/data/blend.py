"""Blending and DeepSpeed-Chat's phase split, as small pure functions.

For each source (after validation):
  1. shuffle its rows with a generator seeded by (data.seed, source name), so adding a source never reshuffles
     another one;
  2. eval rows: the source's own eval split if it has one, else the first `eval_fraction` of the shuffled rows
     (at least one row when the fraction is positive);
  3. weights: when sources have weights, each one's share of the blend is weight / sum(weights). Rows are never
     repeated: the blend takes every row of the source that runs out first and the matching number from the
     others (done separately for the train and the eval rows). Without weights every row is used;
  4. phase split: the train rows, and separately the eval rows, are cut into three contiguous portions sized by
     `data_split` ("2,4,4" -> 20% SFT, 40% reward, 40% PPO prompts); sft_only sources go to SFT whole.
Phases are therefore disjoint, every phase keeps an eval split, each phase's per-source counts follow the
weights (up to rounding by one row), and the result depends only on the rows, the settings and the seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence, TypeVar

PHASES = ("sft", "reward", "ppo")
SPLITS = ("train", "eval")
T = TypeVar("T")


def parse_split(data_split: str) -> list[float]:
    return [float(x) for x in data_split.split(",")]


def split_sizes(n: int, parts: Sequence[float]) -> list[int]:
    """Cut n rows into len(parts) contiguous portions proportional to `parts` (cumulative rounding: sums to n)."""
    total = float(sum(parts))
    bounds, acc = [0], 0.0
    for p in parts:
        acc += p
        bounds.append(math.floor(n * acc / total + 0.5))
    return [b - a for a, b in zip(bounds, bounds[1:])]


def eval_size(n: int, fraction: float) -> int:
    """Rows carved out for evaluation: round(n * fraction), at least 1 (when fraction > 0), leaving one to train."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))


def weighted_sizes(available: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many rows to take from each source so the shares match the weights without repeating a row."""
    total_w = float(sum(weights))
    blend = min(n * total_w / w for n, w in zip(available, weights))
    return [min(n, math.floor(blend * w / total_w + 0.5)) for n, w in zip(available, weights)]


def seeded_shuffle(items: Sequence[T], seed: int, name: str) -> list[T]:
    out = list(items)
    random.Random(f"{seed}:{name}").shuffle(out)
    return out


@dataclass
class Pool:
    """One source's validated rows going into the blend."""

    name: str
    train: list
    eval: list | None  # the source's own eval split, or None to carve one out of train
    weight: float | None = None
    sft_only: bool = False


@dataclass
class Blend:
    phases: dict[tuple[str, str], list]  # (phase, split) -> rows
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"sft.train": n, ...}


def blend(pools: list[Pool], data_split: str, eval_fraction: float, seed: int) -> Blend:
    """Shuffle, carve eval, weight, and split the pools into the six (phase, split) portions."""
    parts = parse_split(data_split)
    train, evals = [], []
    for p in pools:
        rows = seeded_shuffle(p.train, seed, f"{p.name}:train")
        if p.eval is not None:
            ev = seeded_shuffle(p.eval, seed, f"{p.name}:eval")
        else:
            k = eval_size(len(rows), eval_fraction)
            ev, rows = rows[:k], rows[k:]
        train.append(rows)
        evals.append(ev)
    mixed = [i for i, p in enumerate(pools) if not p.sft_only]
    if mixed and all(pools[i].weight is not None for i in mixed):
        w = [pools[i].weight for i in mixed]
        for lists in (train, evals):
            for i, k in zip(mixed, weighted_sizes([len(lists[i]) for i in mixed], w)):
                lists[i] = lists[i][:k]
    phases: dict[tuple[str, str], list] = {(ph, s): [] for ph in PHASES for s in SPLITS}
    per_source: dict[str, dict[str, int]] = {}
    for i, p in enumerate(pools):
        counts = per_source.setdefault(p.name, {f"{ph}.{s}": 0 for ph in PHASES for s in SPLITS})
        for split, rows in (("train", train[i]), ("eval", evals[i])):
            sizes = [len(rows), 0, 0] if p.sft_only else split_sizes(len(rows), parts)
            start = 0
            for ph, n in zip(PHASES, sizes):
                phases[(ph, split)] += rows[start:start + n]
                counts[f"{ph}.{split}"] += n
                start += n
    for key in phases:  # mix the sources inside each portion (deterministically)
        phases[key] = seeded_shuffle(phases[key], seed, "/".join(key))
    return Blend(phases, per_source)
