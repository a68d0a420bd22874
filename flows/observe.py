"""Observability glue: relay a stage job's output to the Prefect run logger, a log file and the CLI; turn its
progress lines into a Prefect progress artifact; publish a metrics table and a link for every stage artifact, on
the stage's own task run (ran or cached), under keys of the run's experiment (`<experiment>-<stage>-metrics`),
so one experiment's latest never replaces another's.

Nothing here decides anything about caching or placement; failures to publish are logged, never fatal.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

from rlhf_tasks.store import ArtifactStore
from rlhf_tasks.training.op_builds import BUILD_PREFIX
from rlhf_tasks.store_links import StoreLink, artifact_link

# `step 12/100 loss=0.5 ...` as printed by the training core's MetricsLogger (and anything similar).
_STEP_RE = re.compile(r"\bstep\s*[:=]?\s*(\d+)\s*/\s*(\d+)", re.IGNORECASE)
_KV_RE = re.compile(r"([A-Za-z_][\w./-]*)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")

# The CLI's echo: `rlhf run` installs a printer; deployment runs leave it unset (their output is the run log).
_console: Callable[[str], None] | None = None


def set_console(fn: Callable[[str], None] | None) -> None:
    global _console
    _console = fn


def console(line: str) -> None:
    if _console is not None:
        _console(line)


def parse_progress(line: str) -> tuple[int, int, dict[str, float]] | None:
    """`(step, total, metrics)` from a progress line, or None. Metrics are the `name=number` pairs on the line."""
    m = _STEP_RE.search(line)
    if not m:
        return None
    step, total = int(m.group(1)), int(m.group(2))
    if total <= 0 or step < 0:
        return None
    return step, total, {k: float(v) for k, v in _KV_RE.findall(line)}


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


class StageLog:
    """The `log` callable handed to the launcher (which also writes `<run_dir>/<stage>.log`): each job line goes
    to the Prefect run logger; progress lines also update a progress artifact (throttled) and reach the CLI."""

    def __init__(self, stage: str, run_dir: str | Path, logger=None, min_interval_s: float = 2.0,
                 experiment: str = "rlhf"):
        self.stage = stage
        self.experiment = experiment  # the progress artifact's key: `<experiment>-<stage>-progress`
        self.logger = logger
        self.path = Path(run_dir) / f"{stage}.log"  # written by the launcher
        self._artifact_id = None
        self._last_update = 0.0
        self._last_echo = 0.0
        self.min_interval_s = min_interval_s
        self.last_progress: tuple[int, int, dict] | None = None

    def __call__(self, line: str) -> None:
        line = line.rstrip("\n")
        if self.logger is not None:
            self.logger.info(line)
        if line.startswith("[lock] "):  # waiting for, or reusing, another run's artifact: the user should know
            console(f"  {line.removeprefix('[lock] ')}")
            return
        if line.startswith(BUILD_PREFIX):  # a one-time compile of minutes ahead: without this it looks hung
            text = f"{self.stage}: {line.removeprefix(BUILD_PREFIX)}"
            console(f"  {text}")
            self._publish_progress(0.0, text)
            return
        prog = parse_progress(line)
        if prog is None:
            return
        self.last_progress = prog
        step, total, _ = prog
        now = time.monotonic()
        final = step >= total
        if final or now - self._last_echo >= self.min_interval_s:
            self._last_echo = now
            text = line.strip()
            text = text if text.startswith(f"[{self.stage}]") else f"[{self.stage}] {text}"
            console(f"  {text[:157]}..." if len(text) > 160 else f"  {text}")
        if final or now - self._last_update >= self.min_interval_s:
            self._last_update = now
            self._publish_progress(100.0 * min(step, total) / total, f"{self.stage}: step {step}/{total}")

    def _publish_progress(self, pct: float, description: str) -> None:
        if self.logger is None:  # not inside a Prefect run
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(
                    pct, key=artifact_key(self.experiment, self.stage, "progress"), description=description)
            else:
                update_progress_artifact(self._artifact_id, pct, description=description)
        except Exception as e:  # observability must never fail a stage
            self.logger.warning(f"progress artifact not updated: {e}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_samples(store: ArtifactStore, stage: str, key: str, limit: int = 4) -> list[dict]:
    """A few sample generations if the artifact has them (samples.json, or metrics.json's `samples`)."""
    base = f"{store.root}/{stage}/{key}"
    for name, field in (("samples.json", None), ("metrics.json", "samples")):
        try:
            with store.fs.open(f"{base}/{name}", "r") as f:
                data = json.load(f)
        except (FileNotFoundError, OSError, ValueError):
            continue
        if field is not None:
            data = data.get(field) if isinstance(data, dict) else None
        if isinstance(data, dict):
            data = data.get("samples")
        if isinstance(data, list) and data:
            return [s for s in data[:limit] if isinstance(s, dict)]
    return []


def stage_markdown(stage: str, status: str, link: StoreLink, key: str, metrics: dict, samples: list[dict]) -> str:
    lines = [f"### {stage}: {status}", "", f"Stage key: `{key}`", "", link.markdown(f"{stage} artifact"), ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("_no metrics recorded_")
    if samples:
        lines += ["", "#### Samples", ""]
        for s in samples:
            prompt = str(s.get("prompt", "")).strip().replace("\n", " ")[:300]
            lines.append(f"**Prompt:** {prompt}")
            for k, v in s.items():
                if k != "prompt" and isinstance(v, (str, int, float)):
                    lines.append(f"- *{k}*: {str(v).strip().replace(chr(10), ' ')[:300]}")
            lines.append("")
    return "\n".join(lines)


def _on_task_run(task_run_id):
    """Artifact constructors bound to a task run (None: the current run context's), with the signatures of
    Prefect's create_*_artifact functions: `(markdown=|link=|table=, key=, description=, ...)`."""
    from prefect.artifacts import LinkArtifact, MarkdownArtifact, TableArtifact

    def make(cls):
        return lambda **fields: cls(task_run_id=task_run_id, **fields).create()

    return make(MarkdownArtifact), make(LinkArtifact), make(TableArtifact)


def publish_stage_artifacts(store: ArtifactStore, stage: str, key: str, uri: str, status: str,
                            metrics: dict, logger=None, *, experiment: str = "rlhf", task_run_id=None) -> None:
    """On the stage's task run (`task_run_id`, also for a cached one, whose function never ran): a markdown
    artifact (status, stage key, a link a browser opens or the URI and `rlhf store get` command, metrics,
    sample generations) and, when the store has an http(s) link, a link artifact."""
    try:
        markdown, link_artifact, _ = _on_task_run(task_run_id)
        kind, akey = store.parse_uri(uri)
        link = artifact_link(store, kind, akey)
        samples = read_samples(store, stage, key)
        markdown(markdown=stage_markdown(stage, status, link, key, metrics, samples),
                 key=artifact_key(experiment, stage, "metrics"), description=f"{stage} metrics ({status})")
        if link.url is not None:
            link_artifact(link=link.url, link_text=f"{stage}/{key} ({link.file}, {link.how} link)",
                          key=artifact_key(experiment, stage, "artifact"), description=f"{stage} artifact in the store")
    except Exception as e:
        if logger is not None:
            logger.warning(f"{stage}: artifacts not published: {e}")


def publish_eval_report(store: ArtifactStore, uri: str, experiment: str, logger=None, *, task_run_id=None) -> None:
    """The evaluation report (comparison table, samples, plots) as Prefect artifacts on the eval task run, via the
    eval stage's own publisher."""
    try:
        from rlhf_tasks.evaluation.report import publish_report

        markdown, _, table = _on_task_run(task_run_id)
        publish_report(uri, markdown=markdown, table=table, key=artifact_key(experiment, "eval"), store=store)
    except Exception as e:
        if logger is not None:
            logger.warning(f"eval report not published as Prefect artifacts: {e}")


def report_line(store: ArtifactStore, record: dict, experiment: str) -> str:
    """The flow run's last log line: where the report is (Prefect artifact, store link or URI, CLI command), or
    the run record when the run stopped before eval."""
    eval_uri = record.get("eval_uri")
    if not eval_uri:
        return (f"no report: the run ended at {record.get('until')}; run record "
                f"{store.url}/runs/{record['run_id']}.json")
    kind, key = store.parse_uri(eval_uri)
    link = artifact_link(store, kind, key, "report.md")
    where = link.url or f"{eval_uri}/report.md"
    return (f"report: {where}{f' ({link.how} link)' if link.url else ''}; in Prefect: the eval task run's "
            f"artifacts ({artifact_key(experiment, 'eval')}-report); from a shell: "
            f"`rlhf report {record['run_id']} --store {store.url}`")
