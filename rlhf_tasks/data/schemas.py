"""Column layouts of preference / instruction datasets and their mapping onto (prompt, chosen, rejected).

A `Mapping` says which column holds what. Three kinds:
  pair     prompt, chosen, rejected                         (rm-static, full-hh-rlhf, synthetic-instruct-gptj-
                                                              pairwise, rlhf-reward-datasets, local/jsonfile)
  ranked   prompt, response_a, response_b + score_a/score_b (higher wins; equal scores are a tie, dropped and
           or label (which response is preferred)            counted) — webgpt_comparisons, SHP
  sft      prompt, response                                  (SFT-only sets)
Each row maps to {prompt, chosen, rejected|None, gold|None} plus the source column of each, so a validation error
names the column the user has to fix.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConfigError, DataError
from .gold import known_gold_scorers

ROLES = ("prompt", "chosen", "rejected", "response", "response_a", "response_b", "score_a", "score_b", "label")


@dataclass(frozen=True)
class Mapping:
    """role -> column for one schema. `label_a` / `label_b`: label values meaning response_a / _b is preferred."""

    name: str
    columns: dict[str, str]
    label_a: tuple = (0, "0", "a", "A")
    label_b: tuple = (1, "1", "b", "B")
    strip_citations: bool = False  # WebGPT answers carry "[1]"-style references

    @property
    def kind(self) -> str:
        if "response_a" in self.columns:
            return "ranked"
        if "rejected" in self.columns:
            return "pair"
        return "sft"


_PCR = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
SCHEMAS: dict[str, Mapping] = {
    "prompt_chosen_rejected": Mapping("prompt_chosen_rejected", _PCR),
    "rm-static": Mapping("rm-static", _PCR),
    "full-hh-rlhf": Mapping("full-hh-rlhf", _PCR),
    "synthetic-instruct-gptj-pairwise": Mapping("synthetic-instruct-gptj-pairwise", _PCR),
    "rlhf-reward-datasets": Mapping("rlhf-reward-datasets", _PCR),
    "local/jsonfile": Mapping("local/jsonfile", _PCR),
    "prompt_response": Mapping("prompt_response", {"prompt": "prompt", "response": "response"}),
    "prompt_chosen": Mapping("prompt_chosen", {"prompt": "prompt", "response": "chosen"}),
    "webgpt_comparisons": Mapping(
        "webgpt_comparisons",
        {"prompt": "question.full_text", "response_a": "answer_0", "response_b": "answer_1", "score_a": "score_0",
         "score_b": "score_1"},
        strip_citations=True,
    ),
    # SHP: labels == 1 means human_ref_A is preferred.
    "shp": Mapping("shp", {"prompt": "history", "response_a": "human_ref_A", "response_b": "human_ref_B",
                           "label": "labels"}, label_a=(1, "1"), label_b=(0, "0")),
}
HUB_SCHEMAS = {
    "dahoas/rm-static": "rm-static",
    "dahoas/full-hh-rlhf": "full-hh-rlhf",
    "dahoas/synthetic-instruct-gptj-pairwise": "synthetic-instruct-gptj-pairwise",
    "yitingxie/rlhf-reward-datasets": "rlhf-reward-datasets",
    "openai/webgpt_comparisons": "webgpt_comparisons",
    "stanfordnlp/shp": "shp",
}


def schema_by_name(name: str, where: str) -> Mapping:
    """A known schema by name; hub names (Dahoas/rm-static) and their last part are accepted too."""
    key = name.strip()
    key = HUB_SCHEMAS.get(key.lower(), key)
    if key not in SCHEMAS and key.lower().rsplit("/", 1)[-1] in SCHEMAS:
        key = key.lower().rsplit("/", 1)[-1]
    if key not in SCHEMAS:
        raise ConfigError(f"{where}.schema: unknown schema {name!r} (known: {', '.join(sorted(SCHEMAS))})")
    return SCHEMAS[key]


def _top(col: str) -> str:
    return col.split(".", 1)[0]


def infer_schema(columns: list[str]) -> Mapping | None:
    """Guess the schema from a source's columns (None if nothing fits)."""
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return SCHEMAS["prompt_chosen_rejected"]
    for name in ("webgpt_comparisons", "shp"):
        if {_top(c) for c in SCHEMAS[name].columns.values()} <= cols:
            return SCHEMAS[name]
    if {"prompt", "response"} <= cols:
        return SCHEMAS["prompt_response"]
    if {"prompt", "chosen"} <= cols:
        return SCHEMAS["prompt_chosen"]
    return None


def custom_mapping(fields: dict[str, str], columns: list[str], where: str) -> Mapping:
    """A mapping from the config's `fields`; roles left out default to a column of the same name if present."""
    bad = sorted(set(fields) - set(ROLES))
    if bad:
        raise ConfigError(f"{where}.fields: unknown key {bad[0]!r} (keys: {', '.join(ROLES)})")
    cols = dict(fields)
    present = set(columns)
    if "response_a" in cols or "response_b" in cols:
        need, choice = ["prompt", "response_a", "response_b"], ("score_a", "score_b", "label")
    elif "response" in cols:
        need, choice = ["prompt", "response"], ()
    else:
        need, choice = ["prompt", "chosen", "rejected"], ()
    for role in need + list(choice):
        if role not in cols and role in present:
            cols[role] = role
    missing = [r for r in need if r not in cols]
    if choice and not ({"score_a", "score_b"} <= set(cols) or "label" in cols):
        missing.append("score_a+score_b or label")
    if missing:
        raise ConfigError(f"{where}.fields: missing {', '.join(missing)} (columns: {', '.join(sorted(present))})")
    return Mapping("custom", cols)


def resolve_mapping(schema: str | None, fields: dict[str, str], hub_name: str | None, columns: list[str],
                    where: str, label: str) -> Mapping:
    """The mapping for a source: explicit `fields`, else an explicit schema, else the hub name, else the columns.
    Checks that every mapped column exists (DataError naming the source and its columns otherwise)."""
    if fields:
        m = custom_mapping(fields, columns, where)
    elif schema:
        m = schema_by_name(schema, where)
    elif hub_name and hub_name.lower() in HUB_SCHEMAS:
        m = SCHEMAS[HUB_SCHEMAS[hub_name.lower()]]
    else:
        m = infer_schema(columns)
        if m is None:
            raise DataError(
                f"{label}: cannot tell the schema from the columns ({', '.join(sorted(columns)) or 'none'}); "
                f"set `schema` or `fields` (prompt/chosen/rejected, response_a/response_b + score or label, "
                f"or prompt/response)"
            )
    missing = sorted({_top(c) for c in m.columns.values()} - set(columns))
    if missing:
        raise DataError(f"{label}: schema {m.name} needs column(s) {', '.join(missing)}; the source has "
                        f"{', '.join(sorted(columns)) or 'none'} (set `fields` to map other names)")
    return m


# ---- one row ---------------------------------------------------------------------------------------------
class RowProblem(Exception):
    """A bad row: `column` is the source column to fix, `reason` a short key used for the skip counts."""

    def __init__(self, column: str, reason: str, message: str):
        self.column, self.reason, self.message = column, reason, message
        super().__init__(message)


class Tie(Exception):
    """A ranked row whose two responses score the same: no preference, the row is dropped (not an error)."""


_MISSING = object()
_CITATION = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")


def get_column(row: dict, col: str):
    value = row
    for part in col.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _text(row: dict, col: str, strip_citations: bool = False) -> str:
    v = get_column(row, col)
    if v is _MISSING or v is None:
        raise RowProblem(col, "missing", "missing value")
    if not isinstance(v, str):
        raise RowProblem(col, "not_string", f"expected a string, got {type(v).__name__} {str(v)[:40]!r}")
    if "\x00" in v:  # a NUL is never text: a binary or corrupt source (tokenizers and C readers choke on it)
        raise RowProblem(col, "nul_char", "contains a NUL character (\\x00)")
    if strip_citations:
        v = _CITATION.sub("", v)
    v = v.strip()
    if not v:
        raise RowProblem(col, "empty", "empty string")
    return v


def _number(row: dict, col: str) -> float:
    v = get_column(row, col)
    if v is _MISSING or v is None:
        raise RowProblem(col, "missing", "missing score")
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = math.nan
    if math.isnan(x):
        raise RowProblem(col, "bad_score", f"expected a number, got {str(v)[:40]!r}")
    return x


def _gold(row: dict, source_gold: str | None) -> str | None:
    """The row's gold scorer name: the source's setting (`none`: no gold), else the row's `gold` column."""
    if source_gold is not None:
        return None if source_gold == "none" else source_gold
    value = get_column(row, "gold")
    if value is _MISSING or value is None:
        return None
    if value not in known_gold_scorers():
        raise RowProblem("gold", "unknown_gold", f"unknown gold scorer {str(value)[:40]!r} (known: "
                                                 f"{', '.join(known_gold_scorers())}; set the source's `gold`)")
    return value


def map_row(m: Mapping, row: dict, gold: str | None = None) -> dict:
    """Raw row -> {prompt, chosen, rejected, gold, columns: {role: source column}}. Raises RowProblem or Tie.
    `gold`: the source's gold scorer (`none`: no gold), else the row's `gold` column."""
    c = m.columns
    out = {"prompt": _text(row, c["prompt"]), "columns": {"prompt": c["prompt"]}}
    if m.kind == "pair":
        out["chosen"], out["rejected"] = _text(row, c["chosen"]), _text(row, c["rejected"])
        out["columns"].update(chosen=c["chosen"], rejected=c["rejected"])
    elif m.kind == "sft":
        out["chosen"], out["rejected"] = _text(row, c["response"]), None
        out["columns"]["chosen"] = c["response"]
    else:
        a = _text(row, c["response_a"], m.strip_citations)
        b = _text(row, c["response_b"], m.strip_citations)
        if "label" in c:
            lab = get_column(row, c["label"])
            if isinstance(lab, bool):
                lab = int(lab)
            if lab in m.label_a:
                a_wins = True
            elif lab in m.label_b:
                a_wins = False
            else:
                raise RowProblem(c["label"], "bad_label", f"label {lab!r} is neither {m.label_a[0]!r} (response_a "
                                                          f"preferred) nor {m.label_b[0]!r} (response_b preferred)")
        else:
            sa, sb = _number(row, c["score_a"]), _number(row, c["score_b"])
            if sa == sb:
                raise Tie()
            a_wins = sa > sb
        win, lose = ("response_a", "response_b") if a_wins else ("response_b", "response_a")
        out["chosen"], out["rejected"] = (a, b) if a_wins else (b, a)
        out["columns"].update(chosen=c[win], rejected=c[lose])
    if out["rejected"] is not None and out["chosen"] == out["rejected"]:
        raise RowProblem(out["columns"]["rejected"], "same_response", "chosen and rejected are the same text")
    out["gold"] = _gold(row, gold)
    return out
