"""Row validation: every row is checked before anything is written; bad rows fail or are skipped and counted.

Checks (the reason key used in the skip counts in brackets):
  a mapped field is absent or null [missing], not a string [not_string], blank [empty], holds a NUL character
  [nul_char];
  chosen == rejected [same_response]; a score that is not a number [bad_score]; a label that names neither
  response [bad_label]; a `gold` column naming no registered scorer [unknown_gold];
  the same (prompt, chosen, rejected) as an earlier row of any source [duplicate];
  a formatted prompt longer than `data.max_prompt_len` tokens [prompt_too_long].
`on_bad_row: fail` (default) raises DataError("source:row:field: reason") at the first bad row; `skip` drops the
row and counts it per reason. Ranked rows whose two scores are equal carry no preference: they are dropped and
counted as ties in both modes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import DataError
from .schemas import Mapping, RowProblem, Tie, map_row
from .sources import LoadedSource

MAX_EXAMPLES = 10  # skipped-row messages kept for data_info.json


@dataclass
class Example:
    """One validated row on its way into the artifact."""

    source: str
    label: str  # source label for messages
    row: int
    prompt: str
    chosen: str | None
    rejected: str | None
    gold: str | None
    columns: dict  # role -> source column (for messages)
    prompt_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    chosen_ids: list[int] | None = None
    rejected_ids: list[int] | None = None

    @property
    def content(self) -> tuple:
        return self.prompt, self.chosen, self.rejected

    @property
    def where(self) -> str:
        return f"{self.label}:{self.row}"


class BadRows:
    """Fails at the first bad row, or counts skipped rows per reason (overall and per source)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.counts: Counter = Counter()
        self.per_source: dict[str, Counter] = {}
        self.examples: list[str] = []

    def __call__(self, source: str, label: str, row: int, column: str, reason: str, message: str) -> None:
        msg = f"{label}:{row}:{column}: {message}"
        if self.mode == "fail":
            raise DataError(msg)
        self.counts[reason] += 1
        self.per_source.setdefault(source, Counter())[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(msg)


def map_rows(loaded: LoadedSource, mapping: Mapping, bad: BadRows) -> tuple[dict[str, list[Example]], int]:
    """Map and check every row of a source -> ({split: examples}, number of ties dropped)."""
    name = loaded.source.name
    out: dict[str, list[Example]] = {}
    ties = 0
    for split, rows in loaded.splits.items():
        kept = out.setdefault(split, [])
        for raw in rows:
            try:
                m = map_row(mapping, raw.data, loaded.source.cfg.gold)
            except Tie:
                ties += 1
                continue
            except RowProblem as p:
                bad(name, raw.label, raw.row, p.column, p.reason, p.message)
                continue
            kept.append(Example(name, raw.label, raw.row, m["prompt"], m["chosen"], m["rejected"], m["gold"],
                                m["columns"]))
    return out, ties


def drop_duplicates(examples: list[Example], seen: dict[tuple, str], bad: BadRows) -> list[Example]:
    """Rows equal to an earlier one (in any source: `seen` is shared) are bad rows."""
    kept = []
    for ex in examples:
        first = seen.get(ex.content)
        if first is not None:
            bad(ex.source, ex.label, ex.row, ex.columns["prompt"], "duplicate",
                f"duplicate row (same prompt, chosen and rejected as {first})")
            continue
        seen[ex.content] = ex.where
        kept.append(ex)
    return kept


def drop_long_prompts(examples: list[Example], max_len: int, bad: BadRows) -> list[Example]:
    """Rows whose tokenized prompt (after formatting) exceeds `max_len` tokens are bad rows."""
    kept = []
    for ex in examples:
        if len(ex.prompt_ids) > max_len:
            bad(ex.source, ex.label, ex.row, ex.columns["prompt"], "prompt_too_long",
                f"prompt has {len(ex.prompt_ids)} tokens, data.max_prompt_len is {max_len}")
            continue
        kept.append(ex)
    return kept
