"""The evaluation report: markdown + PNG plots from an eval artifact's files, `rlhf report`, and a Prefect-free
publishing hook for the flow.

An eval artifact (or any folder with the same files) holds:
  metrics.json   {"summary": {flat scalars}, "samples": [...first few...], "meta": {...}, "upstream": {...}}
  samples.json   one record per held-out prompt (every policy's answer and scores)
  curves.json    {stage: history list} copied from the upstream artifacts' metrics.json
`write_report(src, out)` turns these into out/report.md and out/plots/*.png; the stage and `rlhf report` both use
it, so a regenerated report is the same as the committed one.
"""
from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import StoreError, UserError
from . import metrics, plots

POLICY_ORDER = ("sft", "ppo", "ema")
POLICY_TITLES = {"sft": "SFT", "ppo": "PPO", "ema": "PPO (EMA)"}
METHOD_TITLES = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO"}  # config.methods' rows, as shown


def policy_titles(method: str | None) -> dict[str, str]:
    """Display names of the policies: the method's policy (its summary keys sit in the `ppo` slot) under the
    method's name (`meta.method` of the eval artifact; older artifacts have none and were PPO's)."""
    name = METHOD_TITLES.get(method or "ppo", str(method).upper())
    return {"sft": "SFT", "ppo": name, "ema": f"{name} (EMA)"}
DECODINGS = ("greedy", "sampled")  # summary key prefixes `greedy/`, `sampled/` (evaluation.stage)
MAX_CELL = 240


# ---- reading --------------------------------------------------------------------------------------------
def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def load_eval_folder(src: Path) -> tuple[dict, list[dict], dict]:
    """(metrics.json document, all samples, curves) of an eval folder; missing files read as empty."""
    src = Path(src)
    doc = _read_json(src / "metrics.json", {})
    if not isinstance(doc, dict) or "summary" not in doc:
        raise UserError(f"{src}: not an evaluation artifact (no metrics.json with a summary)")
    samples = _read_json(src / "samples.json", None)
    if not isinstance(samples, list):
        samples = doc.get("samples") or []
    curves = _read_json(src / "curves.json", {})
    return doc, samples, curves if isinstance(curves, dict) else {}


def policies_of(summary: dict) -> list[str]:
    return [p for p in POLICY_ORDER if any(f"{pre}rm_{p}" in summary for pre in ("", "greedy/", "sampled/"))]


# ---- tables ---------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(summary: dict, key: str) -> str:
    if key not in summary:
        return "—"
    std = summary.get(f"{key}_std")
    return _fmt(summary[key]) + (f" ± {_fmt(std)}" if std is not None else "")


def table_columns(summary: dict, titles: dict[str, str] = POLICY_TITLES) -> list[tuple[str, str, str]]:
    """(column title, policy, key prefix) of the comparison table: each policy under each decoding the summary
    has (`greedy/`, `sampled/` keys), or each policy once (older artifacts with unprefixed keys only)."""
    pols = policies_of(summary)
    decs = [d for d in DECODINGS if f"{d}/rm_sft" in summary]
    if not decs:
        return [(titles[p], p, "") for p in pols]
    return [(f"{titles[p]} {d}", p, f"{d}/") for d in decs for p in pols]


def comparison_rows(summary: dict, titles: dict[str, str] = POLICY_TITLES) -> list[dict[str, str]]:
    """The comparison table as rows {metric, <column title>...}; rows with no value for any column are left
    out. Used for report.md and for the Prefect table artifact."""

    def vs_sft(name: str, p: str, pre: str, digits: int = 3) -> str:
        return "—" if p == "sft" else _fmt(summary.get(pre + name + ("" if p == "ppo" else f"_{p}")), digits)

    def gain(p: str, pre: str) -> str:
        g = pre + "gold_gain" + ("" if p == "ppo" else f"_{p}")
        if p == "sft" or g not in summary:
            return "—"
        return f"{summary[g]:+.3f} [{summary[g + '_ci_low']:+.3f}, {summary[g + '_ci_high']:+.3f}]"

    spec: list[tuple[str, Callable[[str, str], str]]] = [
        ("reward-model score (mean ± std)", lambda p, pre: _pm(summary, f"{pre}rm_{p}")),
        ("reward function score (mean ± std)", lambda p, pre: _pm(summary, f"{pre}fn_{p}")),
        ("gold score (mean ± std)", lambda p, pre: _pm(summary, f"{pre}gold_{p}")),
        ("gold − SFT's, mean [95% paired bootstrap CI]", gain),
        ("sign test p, gold vs SFT", lambda p, pre: vs_sft("gold_sign_p", p, pre, 4)),
        ("win rate vs SFT, reward model", lambda p, pre: vs_sft("win_rate_rm", p, pre)),
        ("win rate vs SFT, reward function", lambda p, pre: vs_sft("win_rate_fn", p, pre)),
        ("win rate vs SFT, gold", lambda p, pre: vs_sft("win_rate_gold", p, pre)),
        ("KL to reference (SFT), nats/answer", lambda p, pre: _pm(summary, f"{pre}kl_{p}_ref")),
        ("exact per-token KL to reference, nats/answer", lambda p, pre: _fmt(summary.get(f"{pre}kl_{p}_ref_exact"))),
        ("response length, tokens", lambda p, pre: _fmt(summary.get(f"{pre}len_{p}"), 1)),
        ("EOS rate", lambda p, pre: _fmt(summary.get(f"{pre}eos_rate_{p}"))),
        ("distinct-1 (words)", lambda p, pre: _fmt(summary.get(f"{pre}distinct1_{p}"))),
        ("distinct-2 (word pairs)", lambda p, pre: _fmt(summary.get(f"{pre}distinct2_{p}"))),
        ("repetition rate (repeated word pairs)", lambda p, pre: _fmt(summary.get(f"{pre}repetition_{p}"))),
    ]
    cols = table_columns(summary, titles)
    rows = []
    for label, fn in spec:
        row = {"metric": label, **{title: fn(p, pre) for title, p, pre in cols}}
        if any(v != "—" for k, v in row.items() if k != "metric"):
            rows.append(row)
    return rows


def _cell(text: Any, limit: int = MAX_CELL) -> str:
    s = "" if text is None else str(text)
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "∅"


def sample_rows(samples: list[dict], policies: list[str], n: int,
                titles: dict[str, str] = POLICY_TITLES) -> list[dict[str, str]]:
    """Sample prompts with each policy's answer, RM and gold score: rows for the report and a table artifact."""
    rows = []
    for s in samples[:n]:
        idx = s.get("index")
        row = {"#": str(idx + 1 if isinstance(idx, int) else len(rows) + 1), "prompt": _cell(s.get("prompt"))}
        for p in policies:
            r = s.get(p) or {}
            t = titles[p]
            row[f"{t} answer"] = _cell(r.get("response"))
            row[f"{t} RM"] = _fmt(r.get("rm"))
            if r.get("gold") is not None:
                row[f"{t} gold"] = _fmt(r.get("gold"))
        rows.append(row)
    # every row gets every column (gold only on some rows)
    cols: list[str] = []
    for r in rows:
        cols.extend(c for c in r if c not in cols)
    return [{c: r.get(c, "—") for c in cols} for r in rows]


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


# ---- markdown -------------------------------------------------------------------------------------------
SECTIONS = ("## Comparison", "## Reward model", "## Sample answers", "## Training curves", "## Artifacts")


def render_markdown(doc: dict, samples: list[dict], plot_paths: dict[str, str]) -> str:
    """The whole report as markdown; plots are linked by their relative paths (plots/*.png)."""
    summary = doc.get("summary", {})
    meta = doc.get("meta", {}) or {}
    cfg = meta.get("config", {}) or {}
    pols = policies_of(summary)
    titles = policy_titles(meta.get("method"))
    n_show = int(cfg.get("num_samples_in_report", 8))
    primary = primary_decoding(cfg)
    sampling = f"sampling (temperature {cfg.get('temperature')}, top-p {cfg.get('top_p')}, seed {cfg.get('seed')})"
    both = any(f"{d}/rm_sft" in summary for d in DECODINGS)
    decoding = (f"answered greedily and by {sampling}; the verdict and the sample answers use the {primary} ones"
                if both else sampling if primary == "sampled" else "greedy decoding")
    lines = [f"# RLHF evaluation: {meta.get('experiment', 'experiment')} (method {titles['ppo']})", ""]
    line = verdict(summary, primary, titles["ppo"])
    if line:
        lines += [line, ""]
    lines.append(f"{int(summary.get('num_prompts', len(samples)))} held-out prompts, {decoding}, "
                 f"at most {cfg.get('max_new_tokens', '?')} new tokens. Policies: "
                 + ", ".join(titles[p] for p in pols) + ".")
    for note in degeneration_notes(summary, primary, titles):
        lines += ["", note]
    lines += ["", SECTIONS[0], "", markdown_table(comparison_rows(summary, titles))]
    lines += [SECTIONS[1], ""]
    if "rm_accuracy" in summary:
        lines.append(f"Pairwise accuracy on {int(summary.get('num_pairs', 0))} held-out preference pairs: "
                     f"**{_fmt(summary['rm_accuracy'])}** (mean margin chosen − rejected "
                     f"{_fmt(summary.get('rm_margin'))}).")
    else:
        lines.append("_No held-out reward pairs in the data artifact._")
    up = doc.get("upstream", {}) or {}
    if isinstance(up.get("reward"), dict) and up["reward"]:
        lines += ["", "Reward stage summary: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(up["reward"].items())
                                                           if isinstance(v, (int, float)))]
    lines += ["", SECTIONS[2], ""]
    lines.append(markdown_table(sample_rows(samples, pols, n_show, titles)))
    lines += [SECTIONS[3], ""]
    if plot_paths:
        for name, rel in plot_paths.items():
            title = {"eval_scores": "Evaluation scores", "ppo_glance": "PPO at a glance"}.get(
                name, plots.STAGE_TITLES.get(name, name))
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    else:
        lines += ["_No training history found in the upstream artifacts._", ""]
    lines += [SECTIONS[4], ""]
    for name, uri in sorted((meta.get("inputs") or {}).items()):
        lines.append(f"- {name}: `{uri}`")
    if meta.get("output_uri"):
        lines.append(f"- eval: `{meta['output_uri']}`")
    lines.append("")
    return "\n".join(lines)


def primary_decoding(cfg: dict) -> str:
    """The decoding the eval config names (`do_sample`): the one the verdict is decided on."""
    return "sampled" if cfg.get("do_sample") else "greedy"


def _gain_text(summary: dict, pre: str) -> str | None:
    g = f"{pre}gold_gain"
    if g not in summary:
        return None
    text = (f"{summary[g]:+.3f} (95% CI {summary[g + '_ci_low']:+.3f} to {summary[g + '_ci_high']:+.3f}")
    if f"{pre}gold_sign_p" in summary:
        text += f", sign test p = {summary[pre + 'gold_sign_p']:.2g}"
    return text + ")"


def verdict(summary: dict, primary: str = "greedy", policy: str = "PPO") -> str:
    """One line: did the `policy` (the method's, PPO by default) beat SFT on gold beyond noise? Decided on the `primary` decoding's paired bootstrap
    interval of the mean gold difference over the held-out prompts (beyond noise = the whole 95% interval above
    zero; worse = below zero); the other decoding's difference, the KL and the prompt count follow."""
    n = int(summary.get("num_prompts", 0))
    pre = f"{primary}/" if f"{primary}/rm_sft" in summary else ""
    g = f"{pre}gold_gain"
    if g not in summary:
        if "win_rate_rm" in summary:
            return (f"**Verdict: no gold scorer on these prompts**; {policy} wins {100 * summary['win_rate_rm']:.0f}% "
                    f"of {n} prompts under the reward model (which {policy} optimised, so this is no proof).")
        return ""
    lo, hi = summary[g + "_ci_low"], summary[g + "_ci_high"]
    head = (f"{policy} beat SFT on gold beyond noise" if lo > 0 else f"{policy} is worse than SFT on gold beyond "
            "noise" if hi < 0 else f"no gold difference between {policy} and SFT beyond noise")
    parts = [f"{primary} answers {_gain_text(summary, pre)}"]
    other = next((d for d in DECODINGS if d != primary and f"{d}/gold_gain" in summary), None)
    if other:
        parts.append(f"{other} {_gain_text(summary, other + '/')}")
    kl = summary.get(f"{pre}kl_ppo_ref_exact", summary.get("kl_ppo_ref"))
    if kl is not None:
        parts.append(f"KL to SFT {kl:.2f} nats/answer")
    return f"**Verdict: {head}** over {n} held-out prompts: " + "; ".join(parts) + "."


def degeneration_notes(summary: dict, primary: str = "greedy", titles: dict[str, str] = POLICY_TITLES) -> list[str]:
    """Warnings when answers are loops (`metrics.repetitive`) or PPO's are much less diverse than SFT's
    (`metrics.less_diverse`), with the likely reason: greedy decoding when only greedy answers loop, PPO when
    only its answers do (reward hacking), the models themselves otherwise."""
    decs = [d for d in DECODINGS if f"{d}/rm_sft" in summary] or [primary]
    pre = {d: (f"{d}/" if f"{d}/rm_sft" in summary else "") for d in decs}
    looping = {(d, p) for d in decs for p in policies_of(summary)
               if metrics.repetitive(summary.get(f"{pre[d]}repetition_{p}", math.nan))}
    notes = []
    if looping:
        which = ", ".join(f"{titles[p]} {d} ({summary[pre[d] + 'repetition_' + p]:.2f})"
                          for d in decs for p in policies_of(summary) if (d, p) in looping)
        if all(d == "greedy" for d, _ in looping) and "sampled" in decs:
            why = ("only greedy answers loop: the policies' next-token distributions are flat, and always taking "
                   "the top token falls into a cycle (typical of tiny models); judge them by the sampled answers")
        elif all(p != "sft" for _, p in looping):
            why = (f"only {titles['ppo']}'s answers loop: the policy found repetition its training signal likes "
                   "(reward hacking)")
        else:
            why = "the SFT policy loops too: the models are too weak for this task or too briefly trained"
        notes.append(f"**Degenerate answers:** repetition rate above {metrics.REPETITION_COLLAPSE} for {which}; "
                     f"{why}.")
    for d in decs:
        for p in policies_of(summary):
            ours, ref = summary.get(f"{pre[d]}distinct2_{p}"), summary.get(f"{pre[d]}distinct2_sft")
            if p != "sft" and ours is not None and ref is not None and metrics.less_diverse(ours, ref):
                notes.append(f"**Less diverse:** {titles[p]} {d} answers have distinct-2 {ours:.2f}, below "
                             f"{metrics.DISTINCT_DROP}x SFT's {ref:.2f}: {titles['ppo']} narrowed onto a few answers "
                             f"(collapse or reward hacking; read the samples).")
    return notes


def write_report(src_dir: Path, out_dir: Path) -> Path:
    """Render report.md and plots/*.png into `out_dir` from the eval files in `src_dir` (may be the same)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    doc, samples, curves = load_eval_folder(src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = plots.make_plots(curves, samples, policies_of(doc.get("summary", {})), out_dir)
    path = out_dir / "report.md"
    path.write_text(render_markdown(doc, samples, made))
    if src_dir.resolve() != out_dir.resolve():
        for name in ("metrics.json", "samples.json", "curves.json"):
            if (src_dir / name).exists():
                (out_dir / name).write_bytes((src_dir / name).read_bytes())
    return path


# ---- locating an eval artifact --------------------------------------------------------------------------
def find_eval_uri(record: Any) -> str | None:
    """The eval stage's artifact URI in a run record / run summary JSON, whatever its exact layout:
    {"eval_uri": ...} (flows' runs/<id>.json), {"stages": {"eval": {"uri": ...}}}, {"stages": [{"stage": "eval",
    "uri": ...}]}, {"eval": "URI"}, ..."""
    uri_keys = ("uri", "artifact_uri", "artifact", "output_uri")
    if isinstance(record, dict):
        if isinstance(record.get("eval_uri"), str):  # flows' run record
            return record["eval_uri"]
        if record.get("stage") == "eval":
            for k in uri_keys:
                if isinstance(record.get(k), str):
                    return record[k]
        ev = record.get("eval")
        if isinstance(ev, str) and "/eval/" in ev.replace("\\", "/"):
            return ev
        if isinstance(ev, dict):
            for k in uri_keys:
                if isinstance(ev.get(k), str):
                    return ev[k]
        for v in record.values():
            found = find_eval_uri(v)
            if found:
                return found
    elif isinstance(record, list):
        for v in record:
            found = find_eval_uri(v)
            if found:
                return found
    return None


def resolve_eval_dir(target: str, store_url: str | None = None, endpoint_url: str | None = None,
                     store=None) -> Path:
    """A local folder with the eval artifact's files for `target`: an eval artifact URI (s3://... or a local
    store path), a local eval folder, a run record JSON file, or a run id (`runs/<id>.json` in the store).
    `store` (an open ArtifactStore) is used for URIs under it and for run ids (its endpoint, its cache)."""
    from ..store import ArtifactStore, open_store_for_uri

    if store is not None:
        if target.rstrip("/").startswith(store.url + "/"):
            kind, key = store.parse_uri(target)
            if kind == "eval":
                return store.get(kind, key)
        store_url, endpoint_url = store_url or store.url, endpoint_url or store.endpoint_url
    p = Path(target).expanduser()
    if p.is_dir() and (p / "metrics.json").exists():
        return p
    if p.is_file():
        uri = find_eval_uri(_read_json(p, None))
        if not uri:
            raise UserError(f"{target}: no eval stage URI in this run record")
        return resolve_eval_dir(uri, store_url, endpoint_url, store)
    if "://" in target:
        st, kind, key = open_store_for_uri(target, endpoint_url)
        if kind != "eval":
            raise UserError(f"{target}: a {kind!r} artifact, expected an eval artifact URI or a run id")
        return st.get(kind, key)
    # a run id: runs/<id>.json in the store
    if store_url is None:
        from ..config import load_config

        store_url = load_config(None).store.url
    if store is None or store.url != store_url:
        store = ArtifactStore(store_url, endpoint_url=endpoint_url)
    run_id = target.removeprefix("runs/").removesuffix(".json")
    try:
        record = store.read_json(f"runs/{run_id}.json")
    except (FileNotFoundError, StoreError):
        raise UserError(f"{target}: not an eval artifact URI, a folder, a run record file, or a run id in "
                        f"{store.url}/runs/") from None
    uri = find_eval_uri(record)
    if not uri:
        raise UserError(f"run {run_id}: its record names no eval artifact (did the run reach the eval stage?)")
    return resolve_eval_dir(uri, store_url, endpoint_url, store)


# ---- publishing (the flow passes Prefect's functions; nothing here imports Prefect) ----------------------
def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "rlhf-eval"


def embed_plots(markdown: str, folder: Path, image_url: Callable[[str], str] | None = None) -> str:
    """Replace `](plots/x.png)` links: with `image_url(rel)` when given (e.g. a served URL), else with inline
    base64 PNG data so the report shows its plots wherever the markdown is displayed."""

    def repl(m: re.Match) -> str:
        rel = m.group(1)
        if image_url is not None:
            return f"]({image_url(rel)})"
        f = folder / rel
        if not f.is_file():
            return m.group(0)
        return f"](data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()})"

    return re.sub(r"\]\((plots/[A-Za-z0-9_.-]+\.png)\)", repl, markdown)


def publish_report(source: str | Path, *, markdown: Callable[..., Any], table: Callable[..., Any] | None = None,
                   key: str = "rlhf-eval", image_url: Callable[[str], str] | None = None,
                   store=None) -> list[Any]:
    """Publish an evaluation report through caller-supplied functions with Prefect's artifact signatures:
    `markdown(markdown=str, key=str, description=str)` and `table(table=list[dict], key=str, description=str)`.

    The flow calls, e.g.:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        publish_report(eval_uri, markdown=create_markdown_artifact, table=create_table_artifact,
                       key=f"{experiment}-eval")
    `source` is an eval artifact URI, a local eval/report folder, a run record file or a run id (pass the open
    ArtifactStore as `store` for S3 endpoints from the config and for run ids). Publishes
    `<key>-report` (the report with plots inlined, or linked through `image_url`), and with `table`,
    `<key>-summary` (comparison table) and `<key>-samples` (sample answers). Returns the callables' results."""
    src = resolve_eval_dir(str(source), store=store)
    report = src / "report.md"
    if not report.exists():
        from ..models import cache_root

        report = write_report(src, cache_root() / "reports" / plots.safe_name(src.name))
    doc, samples, _ = load_eval_folder(src)
    summary = doc.get("summary", {})
    meta = doc.get("meta", {}) or {}
    where = meta.get("output_uri") or str(src)
    k = _artifact_key(key)
    md = embed_plots(report.read_text(), report.parent, image_url)
    out = [markdown(markdown=md, key=f"{k}-report", description=f"Evaluation report ({where})")]
    if table is not None:
        pols = policies_of(summary)
        titles = policy_titles(meta.get("method"))
        n = int((meta.get("config") or {}).get("num_samples_in_report", 8))
        out.append(table(table=comparison_rows(summary, titles), key=f"{k}-summary",
                         description=f"SFT vs {titles['ppo']} on held-out prompts"))
        out.append(table(table=sample_rows(samples, pols, n, titles), key=f"{k}-samples",
                         description="Sample answers with reward-model and gold scores"))
    return out
