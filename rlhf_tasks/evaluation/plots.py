"""PNG plots with matplotlib (Agg backend, no display): training curves of each stage and evaluation scores.

Every function plots what exists: keys missing from some history rows, non-numeric values and empty histories
are skipped rather than errors.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Keys shown first when present (substring match, in this order); other numeric keys follow alphabetically.
PRIORITY = ("loss", "acc", "reward", "score", "gold", "kl", "response_len", "length", "eos", "entropy",
            "explained_var", "clip", "lr", "tokens_per_s")
SKIP = {"step", "epoch", "time", "timestamp", "wall", "global_step"}
MAX_PANELS = 12
# "Did step 3 work" at a glance: the PPO history keys (rlhf_tasks/ppo/trainer.py) of score, KL, entropy, length,
# the update statistics and the gold score, plotted first and together.
PPO_GLANCE = ("reward/score_mean", "kl/ref", "entropy", "response/length", "policy/approx_kl", "policy/clipfrac",
              "gold/mean", "response/eos_rate")
STAGE_TITLES = {"data": "Data", "sft": "SFT", "reward": "Reward model", "ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO",
                "dpo": "DPO", "eval": "Evaluation"}  # every stage (rlhf_tasks.stages.STAGE_DEFS), in pipeline order


def _save(fig, path: Path) -> bool:
    """Lay out, write `path` (its folder made) and free the figure; True, for the plot functions to return."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(history: Iterable[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """history rows -> {key: (steps, values)} for every numeric key; x is `step` when present, else the row
    index."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(history or []):
        if not isinstance(row, dict):
            continue
        x = row.get("step", i)
        x = x if _is_num(x) else i
        for k, v in row.items():
            if k in SKIP or not _is_num(v):
                continue
            xs, ys = out.setdefault(str(k), ([], []))
            xs.append(float(x))
            ys.append(float(v))
    return out


def order_keys(keys: Iterable[str]) -> list[str]:
    def rank(k: str) -> tuple[int, str]:
        low = k.lower()
        for i, p in enumerate(PRIORITY):
            if p in low:
                return i, low
        return len(PRIORITY), low

    return sorted(keys, key=rank)


def plot_history(history: list[dict], title: str, path: Path, max_panels: int = MAX_PANELS,
                 keys: Iterable[str] | None = None) -> bool:
    """One PNG with a panel per numeric metric over steps (only `keys`, in their order, when given). Returns False
    (and writes nothing) when there is nothing to plot."""
    data = series(history)
    keys = [k for k in keys if k in data] if keys is not None else order_keys(data)[:max_panels]
    if not keys:
        return False
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys = data[key]
        ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, markersize=3, linewidth=1.4)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_eval_scores(samples: list[dict], policies: list[str], path: Path) -> bool:
    """Histograms of the reward-model score (and the gold score where present) of each policy's answers."""
    panels = []
    for metric, label in (("rm", "reward-model score"), ("gold", "gold score")):
        vals = {p: [s[p][metric] for s in samples if isinstance(s.get(p), dict) and _is_num(s[p].get(metric))]
                for p in policies}
        if any(vals.values()):
            panels.append((label, vals))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for ax, (label, vals) in zip(axes.flat, panels):
        allv = [v for vs in vals.values() for v in vs]
        lo, hi = min(allv), max(allv)
        bins = 20 if hi > lo else 1
        for p, vs in vals.items():
            if vs:
                mean = sum(vs) / len(vs)
                ax.hist(vs, bins=bins, range=(lo, hi if hi > lo else lo + 1), alpha=0.5,
                        label=f"{p.upper()} (mean {mean:.3f})")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Held-out answers", fontsize=12)
    return _save(fig, path)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "plot"


def make_plots(curves: dict[str, list[dict]], samples: list[dict], policies: list[str],
               out_dir: Path) -> dict[str, str]:
    """Write plots/ppo_glance.png (`PPO_GLANCE`), plots/<stage>.png for every stage with a history and
    plots/eval_scores.png.
    Returns {name: path relative to out_dir} in display order."""
    made: dict[str, str] = {}
    if "ppo" in curves and plot_history(curves["ppo"], "PPO at a glance", out_dir / "plots/ppo_glance.png",
                                        keys=PPO_GLANCE):
        made["ppo_glance"] = "plots/ppo_glance.png"
    order = [s for s in STAGE_TITLES if s in curves] + sorted(s for s in curves if s not in STAGE_TITLES)
    for stage in order:
        rel = f"plots/{safe_name(stage)}.png"
        title = f"{STAGE_TITLES.get(stage, stage)} training curves"
        if plot_history(curves[stage], title, out_dir / rel):
            made[stage] = rel
    if plot_eval_scores(samples, policies, out_dir / "plots/eval_scores.png"):
        made["eval_scores"] = "plots/eval_scores.png"
    return made


def plot_scores_against_kl(points: list[tuple[str, float, dict[str, float]]], path: Path) -> bool:
    """A sweep at a glance: one panel per score (e.g. {"gold score": .., "reward-model score": ..}) against the
    KL to the reference, one labelled point per (label, kl, scores) entry. Points without a finite KL, and
    scores missing from every point, are left out; returns False (writes nothing) when nothing is left."""
    points = [(label, kl, s) for label, kl, s in points if _is_num(kl)]
    names = [n for n in dict.fromkeys(n for _, _, s in points for n in s) if any(_is_num(s.get(n)) for _, _, s in points)]
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(label, kl, s[name]) for label, kl, s in points if _is_num(s.get(name))]
        ax.scatter([kl for _, kl, _ in pts], [v for _, _, v in pts], s=28)
        for label, kl, v in pts:
            ax.annotate(label, (kl, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("KL to reference (SFT), nats/answer", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Sweep: score against KL", fontsize=12)
    return _save(fig, path)
