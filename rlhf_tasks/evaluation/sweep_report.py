"""The comparison report of a sweep: a table of every variant's evaluation (gold, reward-model score, win rates,
KL, length) with the shared SFT baseline, and a plot of gold / reward-model score against KL.

It reads only the sweep record (flows/sweep_loop.py: each variant's stage entries, whose eval metrics are the eval
artifact's summary), so it can be written again from the store at any time. Nothing here imports Prefect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import plots
from .report import _fmt, markdown_table

REPORT_NAME = "sweep-report.md"
PLOT_REL = "plots/sweep_kl.png"
# (column title, key of the policy in the eval summary's primary decoding, digits); `{p}` is the policy
COLUMNS = (
    ("gold", "gold_{p}", 3),
    ("gold − SFT [95% CI]", None, 3),
    ("RM score", "rm_{p}", 3),
    ("win rate vs SFT (RM)", "win_rate_rm", 3),
    ("win rate vs SFT (gold)", "win_rate_gold", 3),
    ("KL to SFT", "kl_{p}_ref", 3),
    ("length", "len_{p}", 1),
)
POLICY = "ppo"  # the eval summary names the method's trained policy `ppo` (rlhf_tasks/evaluation/report.py)


def eval_summary(variant: dict) -> dict | None:
    entry = (variant.get("stages") or {}).get("eval") or {}
    return entry.get("metrics") if entry.get("status") in ("ran", "cached") else None


def _gain(summary: dict) -> str:
    if "gold_gain" not in summary:
        return "—"
    return (f"{summary['gold_gain']:+.3f} [{summary.get('gold_gain_ci_low', float('nan')):+.3f}, "
            f"{summary.get('gold_gain_ci_high', float('nan')):+.3f}]")


def _row(name: str, status: str, summary: dict | None, policy: str) -> dict[str, str]:
    row = {"variant": name, "status": status}
    for title, key, digits in COLUMNS:
        if summary is None:
            row[title] = "—"
        elif key is None:
            row[title] = "—" if policy == "sft" else _gain(summary)
        elif policy == "sft" and "{p}" not in key:
            row[title] = "—"  # win rates compare with SFT itself
        else:
            row[title] = _fmt(summary.get(key.format(p=policy)), digits)
    return row


def variant_rows(record: dict) -> list[dict[str, str]]:
    """The table: the shared SFT baseline (from the first evaluated variant), then one row per variant."""
    variants = record.get("variants") or []
    rows = []
    baseline = next((s for s in map(eval_summary, variants) if s), None)
    if baseline is not None:
        rows.append(_row("SFT (shared baseline)", "—", baseline, "sft"))
    for v in variants:
        rows.append(_row(v["name"], v["status"], eval_summary(v), POLICY))
    return rows


def kl_points(record: dict) -> list[tuple[str, float, dict[str, float]]]:
    """(label, KL, {score name: value}) of every evaluated variant, and of SFT at KL 0 (the reference itself)."""
    points: list[tuple[str, float, dict[str, Any]]] = []
    variants = record.get("variants") or []
    baseline = next((s for s in map(eval_summary, variants) if s), None)
    if baseline is not None:
        points.append(("SFT", 0.0, {"gold score": baseline.get("gold_sft"), "reward-model score":
                                    baseline.get("rm_sft")}))
    for v in variants:
        s = eval_summary(v)
        if s is not None:
            points.append((v["name"], s.get(f"kl_{POLICY}_ref"),
                           {"gold score": s.get(f"gold_{POLICY}"), "reward-model score": s.get(f"rm_{POLICY}")}))
    return points


def render_markdown(record: dict, plot_rel: str | None) -> str:
    grid = ", ".join(f"`{a['key']}` ∈ {a['values']}" for a in record.get("grid") or [])
    shared = ", ".join(record.get("shared") or []) or "none"
    lines = [f"# Sweep {record.get('flow_run_name', '')}", "",
             f"Grid: {grid}. {len(record.get('variants') or [])} variants; stages run once for all of them: "
             f"{shared}. Status: {record.get('status')}, {record.get('wall_s', 0):.1f} s "
             f"(up to {record.get('max_parallel', 1)} stage job(s) at once).", "",
             "Evaluation of each variant on the held-out prompts (primary decoding; win rates and KL against the "
             "shared SFT policy):", "", markdown_table(variant_rows(record))]
    failed = [v for v in record.get("variants") or [] if v.get("error")]
    if failed:
        lines += ["", "Failed variants:", ""] + [f"- {v['name']}: {v['error'].splitlines()[0]}" for v in failed]
    if plot_rel:
        lines += ["", f"![gold and reward-model score against KL]({plot_rel})"]
    lines += ["", "Per variant: its run record `runs/<run id>.json` and eval artifact:", ""]
    for v in record.get("variants") or []:
        uri = ((v.get("stages") or {}).get("eval") or {}).get("uri", "—")
        lines.append(f"- {v['name']}: run `{v.get('run_id')}`, eval `{uri}`")
    return "\n".join(lines) + "\n"


def write_sweep_report(record: dict, out_dir: Path) -> Path:
    """out_dir/sweep-report.md and out_dir/plots/sweep_kl.png (when any variant was evaluated); returns the
    markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plotted = plots.plot_scores_against_kl(kl_points(record), out_dir / PLOT_REL)
    path = out_dir / REPORT_NAME
    path.write_text(render_markdown(record, PLOT_REL if plotted else None), encoding="utf-8")
    return path
