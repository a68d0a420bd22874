"""The `data` artifact: one Parquet file per phase and split, plus data_info.json and metrics.json.

```
<artifact>/{sft,reward,ppo}/{train,eval}.parquet
<artifact>/data_info.json     counts per source/phase/split, token-length stats, tokenizer, format
<artifact>/metrics.json       {"summary": {...flat...}, "counts": ..., "token_stats": ...}
```
Columns (docs/contracts.md): source, row, prompt, chosen, rejected, prompt_text, prompt_ids, chosen_ids,
rejected_ids, gold. Response ids end with EOS; nothing is padded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArtifactCorrupt
from .blend import PHASES, SPLITS

FORMAT = 1
SCHEMA = pa.schema([
    ("source", pa.string()),
    ("row", pa.int64()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("prompt_text", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())),
    ("gold", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)


def phase_path(artifact_dir: str | Path, phase: str, split: str) -> Path:
    if phase not in PHASES or split not in SPLITS:
        raise ValueError(f"unknown phase/split {phase}/{split} (phases {PHASES}, splits {SPLITS})")
    return Path(artifact_dir) / phase / f"{split}.parquet"


def write_phase(artifact_dir: str | Path, phase: str, split: str, rows: list) -> Path:
    """Write rows (objects with the column attributes) as `<phase>/<split>.parquet`."""
    path = phase_path(artifact_dir, phase, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: [getattr(r, c) for r in rows] for c in COLUMNS}, schema=SCHEMA)
    pq.write_table(table, path)
    return path


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _local_dir(artifact: str | Path, store=None) -> Path:
    """A local folder for an artifact folder or a store URI (downloaded and verified once for remote stores)."""
    s = str(artifact)
    if store is not None and s.startswith(store.url + "/"):
        return store.get_uri(s)
    if "://" in s:
        from ..store import open_store_for_uri

        store, kind, key = open_store_for_uri(s)
        return store.get(kind, key)
    return Path(s)


def load_phase(artifact_dir: str | Path, phase: str, split: str, store=None):
    """One phase/split of a data artifact as a `datasets.Dataset` (in memory). `artifact_dir` is the artifact's
    local folder (e.g. `store.get_uri(uri)`) or its URI (pass the `store` to reuse its endpoint and cache)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    path = phase_path(_local_dir(artifact_dir, store), phase, split)
    if not path.exists():
        raise ArtifactCorrupt(f"{artifact_dir}: no {phase}/{split}.parquet (not a data artifact?)")
    return Dataset(InMemoryTable(pq.read_table(path)))


def read_info(artifact_dir: str | Path, store=None) -> dict:
    """The artifact's data_info.json (counts, token stats, tokenizer, prompt format)."""
    path = _local_dir(artifact_dir, store) / "data_info.json"
    if not path.exists():
        raise ArtifactCorrupt(f"{artifact_dir}: no data_info.json (not a data artifact?)")
    return json.loads(path.read_text())
