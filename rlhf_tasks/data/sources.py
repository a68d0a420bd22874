"""Where a source's rows come from: resolve a `SourceConfig`, fingerprint it cheaply, load its rows.

A source `path` is one of
  - a task shipped in the package (`SHIPPED`): `demo` (demo_data/demo.jsonl, for the tiny models) or
    `constraints` (constraints_data/constraints.jsonl, for real pretrained models);
  - a local file (.jsonl, .json, .parquet, .csv);
  - a local folder: DeepSpeed-Chat's local/jsonfile layout (`train.json` + `eval.json`, also under `data/`), or
    data files whose names start with a split name (train*, eval*/test*/validation*); other files count as train;
  - a hub dataset name (`Dahoas/rm-static`), read with `datasets.load_dataset(name, revision=, split=)`;
  - one data file at an fsspec URL (`s3://bucket/data.jsonl`), opened with the store's rules (store.open_fs: the
    store's endpoint, else AWS_ENDPOINT_URL; credentials from the environment), copied once into the local cache
    per object version (URL, ETag, size) and read like a local file. It enters the data key by content: the
    sha256 of its bytes, as a local file with the same name and bytes would (moving a file to the bucket keeps the
    key); an object over `REMOTE_HASH_LIMIT_BYTES` by its ETag and size instead.
Local files are read with Hugging Face `datasets` as well (json/parquet/csv builders). JSON that the Arrow reader
rejects is re-read line by line so that a broken line is reported as `source:line:json`.

Row numbers are 1-based: the line number in JSONL files, the record number elsewhere (CSV: data rows after the
header; hub splits: index + 1). Sources made of several files name the file in messages (`name/file:row:field`).
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import SourceConfig
from ..errors import ConfigError, DataError
from ..hub import resolve_hub_revision
from ..store import cache_root, default_hashes, is_remote, open_fs, sha256_file
from . import constraints, demo
from .gold import known_gold_scorers

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
EVAL_SPLITS = ("eval", "validation", "valid", "dev", "test")
SHIPPED = {"demo": demo.DATA_FILE, "constraints": constraints.DATA_FILE}  # source path -> file in the package
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
REMOTE_HASH_LIMIT_BYTES = 4 << 30  # larger remote objects are fingerprinted by ETag + size, not by their bytes


@dataclass(frozen=True)
class RemoteObject:
    """One data file at a URL, as listed when the source was resolved: what identifies this version of it."""

    url: str
    fs: object = field(repr=False, compare=False)
    path: str = ""
    size: int = 0
    etag: str | None = None

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def version(self) -> dict:
        return {"url": self.url, "etag": self.etag, "size": self.size}


@dataclass
class ResolvedSource:
    """A source config checked against the file system: its name, kind and files per split."""

    cfg: SourceConfig
    name: str
    kind: str  # demo (a SHIPPED task) | file | folder | hub
    where: str  # config location for messages, e.g. data.sources[1]
    root: Path | None = None
    files: dict[str, list[Path]] = field(default_factory=dict)  # "train"/"eval" -> files (local kinds)
    has_eval: bool = False  # the source has its own eval split (else one is carved out of train)
    remote: RemoteObject | None = None  # kind "remote": the object at the URL

    @property
    def hub(self) -> str | None:
        return self.cfg.path if self.kind == "hub" else None

    @property
    def multi_file(self) -> bool:
        return sum(len(v) for v in self.files.values()) > 1

    def label(self, path: Path | None = None) -> str:
        """How messages name this source (with the file when the source has several)."""
        if path is not None and self.multi_file and self.root is not None:
            return f"{self.name}/{path.relative_to(self.root).as_posix()}"
        return self.name


def _split_of(path: Path, root: Path) -> str | None:
    names = [path.stem.lower()] + [p.lower() for p in path.relative_to(root).parts[:-1]]
    for n in names:
        for s in ("train",) + EVAL_SPLITS:
            if n == s or re.match(rf"^{s}[-_.]", n):
                return s
    return None


def _resolve_remote(src: SourceConfig, where: str, endpoint_url: str | None) -> ResolvedSource:
    """A source at a URL: one data file, listed (not read) now. ConfigError naming `where` when the URL's scheme
    is unknown, or the object is missing, a folder or unreachable."""
    url = src.path
    name = url.rstrip("/").rsplit("/", 1)[-1]
    suffix = Path(name).suffix.lower()
    if suffix not in BUILDERS:
        raise ConfigError(f"{where}.path: {url}: a remote source is one data file ({', '.join(BUILDERS)})")
    if src.eval_split:
        raise ConfigError(f"{where}.eval_split: a single file has no splits (use a folder or a hub dataset)")
    try:
        fs, path = open_fs(url, endpoint_url)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"{where}.path: {url}: {_short(e)}") from None
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ConfigError(f"{where}.path: no such object: {url}") from None
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, refused credentials, a bucket we cannot see
        raise ConfigError(f"{where}.path: cannot read {url}: {_short(e)}") from None
    if info.get("type") == "directory":
        raise ConfigError(f"{where}.path: {url} is a folder; a remote source is one data file")
    etag = info.get("ETag") or info.get("etag")
    obj = RemoteObject(url, fs, path, int(info.get("size") or 0), str(etag).strip('"') if etag else None)
    return ResolvedSource(src, src.name or Path(name).stem, "remote", where, remote=obj)


def remote_copy(obj: RemoteObject, where: str) -> Path:
    """A local copy of `obj` in the cache (`<cache>/remote-sources/<version hash>/<name>`), downloaded once per
    object version and checked for its listed size. DataError naming `where` when the download fails."""
    import hashlib
    import os
    import uuid

    version_hash = hashlib.sha256(repr(sorted(obj.version().items())).encode()).hexdigest()[:16]
    folder = cache_root() / "remote-sources" / version_hash
    target = folder / obj.name
    if obj.etag and target.is_file() and target.stat().st_size == obj.size:  # this version, downloaded before
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{obj.name}.{uuid.uuid4().hex}"
    try:
        obj.fs.get_file(obj.path, str(tmp))
        if tmp.stat().st_size != obj.size:
            raise DataError(f"{where}.path: {obj.url} changed while it was read ({tmp.stat().st_size} bytes, "
                            f"listed {obj.size}); run again")
        os.replace(tmp, target)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - network, credentials: one line
        raise DataError(f"{where}.path: cannot download {obj.url}: {_short(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_source(src: SourceConfig, where: str = "data.sources", endpoint_url: str | None = None) -> ResolvedSource:
    """Check a source's path and classify it. ConfigError (naming `where`) when it cannot be used. `endpoint_url`:
    the S3-compatible endpoint of a URL source (the store's; default AWS_ENDPOINT_URL)."""
    if src.gold not in (None, "none"):
        if src.gold not in known_gold_scorers():
            raise ConfigError(f"{where}.gold: unknown gold scorer {src.gold!r} "
                              f"(known: {', '.join(known_gold_scorers())}, or none)")
    if is_remote(src.path):
        return _resolve_remote(src, where, endpoint_url)
    if src.path in SHIPPED:
        shipped = SHIPPED[src.path]
        return ResolvedSource(src, src.name or src.path, "demo", where, shipped.parent, {"train": [shipped]})
    p = Path(src.path).expanduser()
    if p.is_file():
        if p.suffix.lower() not in BUILDERS:
            raise ConfigError(f"{where}.path: {src.path}: unsupported file type (use {', '.join(BUILDERS)})")
        if src.eval_split:
            raise ConfigError(f"{where}.eval_split: a single file has no splits (use a folder or a hub dataset)")
        return ResolvedSource(src, src.name or p.stem, "file", where, p.parent, {"train": [p]})
    if p.is_dir():
        return _resolve_folder(src, p, where)
    if src.path == "local/jsonfile":
        raise ConfigError(f"{where}.path: point it at the folder that holds train.json and eval.json "
                          f"(DeepSpeed-Chat's local/jsonfile layout)")
    if _HUB_NAME.match(src.path) and p.suffix.lower() not in BUILDERS:
        return ResolvedSource(src, src.name or src.path.rsplit("/", 1)[-1], "hub", where,
                              has_eval=src.eval_split is not None)
    raise ConfigError(f"{where}.path: no such file or folder: {src.path}")


def _resolve_folder(src: SourceConfig, p: Path, where: str) -> ResolvedSource:
    name = src.name or p.resolve().name
    for base in (p, p / "data"):  # DeepSpeed-Chat local/jsonfile
        if (base / "train.json").is_file() and src.split == "train":
            files = {"train": [base / "train.json"]}
            if (base / "eval.json").is_file() and src.eval_split in (None, "eval"):
                files["eval"] = [base / "eval.json"]
            elif src.eval_split:
                raise ConfigError(f"{where}.eval_split: {src.eval_split!r}: local/jsonfile folders have eval.json")
            return ResolvedSource(src, name, "folder", where, p, files, "eval" in files)
    found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not found:
        raise ConfigError(f"{where}.path: {src.path}: no data files ({', '.join(BUILDERS)}) in the folder")
    groups: dict[str, list[Path]] = {}
    for f in found:
        groups.setdefault(_split_of(f, p) or "train", []).append(f)
    if src.split not in groups:
        raise ConfigError(f"{where}.split: {src.split!r} not found in {src.path} (splits: {', '.join(sorted(groups))})")
    files = {"train": groups[src.split]}
    if src.eval_split is not None:
        if src.eval_split not in groups:
            raise ConfigError(f"{where}.eval_split: {src.eval_split!r} not found in {src.path} "
                              f"(splits: {', '.join(sorted(groups))})")
        files["eval"] = groups[src.eval_split]
    else:
        auto = next((s for s in EVAL_SPLITS if s in groups and s != src.split), None)
        if auto:
            files["eval"] = groups[auto]
    return ResolvedSource(src, name, "folder", where, p, files, "eval" in files)


def resolve_sources(sources: list[SourceConfig], endpoint_url: str | None = None) -> list[ResolvedSource]:
    """Resolve every source and check the blend settings (unique names, weights on all or none)."""
    out = [resolve_source(s, f"data.sources[{i}]", endpoint_url) for i, s in enumerate(sources)]
    if not out:
        raise ConfigError("data.sources: at least one source is needed")
    seen: dict[str, str] = {}
    for r in out:
        if r.name in seen:
            raise ConfigError(f"{r.where}: two sources are named {r.name!r} ({seen[r.name]} too); set `name`")
        seen[r.name] = r.where
    for r in out:
        if r.cfg.sft_only and r.cfg.weight is not None:
            raise ConfigError(f"{r.where}.weight: weights apply to the blended sources, not to sft_only ones "
                              f"(use max_rows to limit an sft_only source)")
    blended = [r for r in out if not r.cfg.sft_only]
    weighted = [r for r in blended if r.cfg.weight is not None]
    if weighted and len(weighted) != len(blended):
        r = next(r for r in blended if r.cfg.weight is None)
        raise ConfigError(f"{r.where}.weight: set a weight on every source or on none")
    return out


# ---- fingerprints (cheap: content hashes, no parsing) ------------------------------------------------------
def hub_dataset_revision(r: ResolvedSource) -> str:
    """The commit SHA a hub source stands for (hub.resolve_hub_revision; ConfigError naming the source)."""
    return resolve_hub_revision(r.cfg.path, r.cfg.revision, "dataset", where=f"{r.where}.path",
                                revision_field=f"{r.where}.revision")


def fingerprint_source(src: SourceConfig, where: str = "data.sources", endpoint_url: str | None = None) -> dict:
    """What a data stage key records about a source: sha256 of every local file it reads (shipped tasks: their file;
    hashes remembered per file version), or the hub name and the commit SHA it resolves to. A URL source: the
    sha256 of its bytes under its file name (the same record as a local file's), remembered per object version so
    an unchanged object costs one listing; over REMOTE_HASH_LIMIT_BYTES its URL, ETag and size. Reads bytes only;
    nothing is parsed; only URL sources are downloaded (once per version)."""
    r = resolve_source(src, where, endpoint_url)
    if r.kind == "hub":
        return {"kind": "hub", "name": src.path, "revision": hub_dataset_revision(r)}
    if r.kind == "remote":
        obj = r.remote
        if obj.etag and obj.size > REMOTE_HASH_LIMIT_BYTES:
            return {"kind": "remote-object", **obj.version()}
        version = obj.version() if obj.etag else None  # without an ETag no version can be recognised: read it
        sha = default_hashes().sha256(version, lambda: sha256_file(remote_copy(obj, where)))
        return {"kind": "file", "files": {obj.name: sha}}
    files = sorted({f for fs in r.files.values() for f in fs})
    hashes = default_hashes()
    return {"kind": r.kind, "files": {f.relative_to(r.root).as_posix(): hashes.local_sha256(f) for f in files}}


# ---- loading ----------------------------------------------------------------------------------------------
@dataclass
class RawRow:
    label: str  # source label for messages (name or name/file)
    row: int  # 1-based
    data: dict


@dataclass
class LoadedSource:
    source: ResolvedSource
    splits: dict[str, list[RawRow]]  # "train" and, when the source has one, "eval"
    columns: list[str]


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failed read is reported as one DataError line
    return datasets


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _line_numbers(path: Path) -> list[int] | None:
    """1-based numbers of the non-blank lines of a line-delimited JSON file (None for a JSON document)."""
    nums = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                nums.append(i)
    if not nums:
        return nums
    with open(path, "rb") as f:
        first = f.read(4096).lstrip()
    return nums if first.startswith(b"{") else None


def _read_json_plain(path: Path, label: str) -> list[dict]:
    """Fallback reader for JSON the Arrow reader rejects: names the first line that is not a JSON object."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{e.lineno}:json: not valid JSON ({e.msg})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{label}: a JSON file must hold a list of objects")
        return rows
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{i}:json: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{label}:{i}:json: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def _first_byte(path: Path) -> bytes:
    """The first byte that is not whitespace (b"" for a blank file)."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1]


def read_file(path: Path, label: str, max_rows: int | None = None) -> tuple[list[RawRow], list[str]]:
    """Rows of one local data file (via `datasets`), with 1-based row numbers, and its columns."""
    datasets = _quiet_datasets()
    builder = BUILDERS[path.suffix.lower()]
    if path.suffix.lower() == ".jsonl" and _first_byte(path) == b"[":
        raise DataError(f"{label}:1:json: a .jsonl file holds one JSON object per line, this one a JSON array "
                        "(name it .json to read it as a list of rows)")
    try:
        with tempfile.TemporaryDirectory(prefix="rlhf-data-") as tmp:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=tmp)
            if max_rows is not None and len(ds) > max_rows:
                ds = ds.select(range(max_rows))
            columns, rows = list(ds.column_names), ds.to_list()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the Arrow readers raise many types; re-read or report one line
        if builder != "json":
            raise DataError(f"{label}: cannot read {path.name} as {builder}: {_short(e)}") from None
        rows = _read_json_plain(path, label)[:max_rows]
        columns = sorted({k for r in rows for k in r})
    nums = _line_numbers(path) if builder == "json" else None
    if nums is None or len(nums) < len(rows):
        nums = list(range(1, len(rows) + 1))
    return [RawRow(label, n, r) for n, r in zip(nums, rows)], columns


def _load_hub(r: ResolvedSource, split: str) -> tuple[list[RawRow], list[str]]:
    datasets = _quiet_datasets()
    revision = hub_dataset_revision(r)  # the commit the data key names
    try:
        ds = datasets.load_dataset(r.cfg.path, revision=revision, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing split, auth: one line for the user
        raise DataError(f"{r.name}: {r.cfg.path!r} is no local file or folder, and loading it as a hub dataset "
                        f"(split {split!r}, revision {revision[:12]}) failed: {_short(e)}") from None
    if r.cfg.max_rows is not None and len(ds) > r.cfg.max_rows:
        ds = ds.select(range(r.cfg.max_rows))
    return [RawRow(r.name, i + 1, row) for i, row in enumerate(ds.to_list())], list(ds.column_names)


def load_source(r: ResolvedSource) -> LoadedSource:
    """Read a source's rows: its train split and, when it has one, its eval split (max_rows caps each)."""
    splits: dict[str, list[RawRow]] = {}
    columns: set[str] = set()
    if r.kind == "hub":
        wanted = {"train": r.cfg.split, **({"eval": r.cfg.eval_split} if r.cfg.eval_split else {})}
        for split, hub_split in wanted.items():
            splits[split], cols = _load_hub(r, hub_split)
            columns.update(cols)
    else:
        files_of = {"train": [remote_copy(r.remote, r.where)]} if r.kind == "remote" else r.files
        for split, files in files_of.items():
            rows: list[RawRow] = []
            for f in files:
                left = None if r.cfg.max_rows is None else r.cfg.max_rows - len(rows)
                if left is not None and left <= 0:
                    break
                got, cols = read_file(f, r.label(f), left)
                rows += got
                columns.update(cols)
            splits[split] = rows
    return LoadedSource(r, splits, sorted(columns))
