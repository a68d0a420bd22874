"""Content-addressed artifact store over fsspec (local folder, s3:// through s3fs, any fsspec URL).

An artifact lives at `<root>/<kind>/<key>/`. Its files are uploaded first and `manifest.json` (file list with sizes
and sha256, the key and what it was computed from, lineage, producer, created time, metrics) is written LAST: an
artifact without a valid manifest does not exist, so a crash at any point of an upload never leaves something that
verifies. Committed artifacts are immutable.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import fsspec

from .errors import ArtifactCorrupt, StoreError

MANIFEST = "manifest.json"
RESERVED_KINDS = frozenset({"runs"})  # folders of plain JSON documents beside the artifacts (run records)
MANIFEST_FORMAT = 1
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_REL_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def producer_version() -> str:
    from . import __version__

    return f"rlhf-tasks {__version__}"


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for every hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def compute_key(key_inputs: dict) -> str:
    """The content key of an artifact: sha256 of the canonical JSON of everything that determines it (24 hex)."""
    return hashlib.sha256(canonical_json(key_inputs).encode()).hexdigest()[:24]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_name(kind: str, key: str) -> None:
    """Reject names that could escape the root (`..`, `/`, absolute paths, odd characters)."""
    if not isinstance(kind, str) or not _NAME_RE.match(kind):
        raise StoreError(f"bad artifact kind {kind!r}: use lowercase letters, digits, '-' and '_'")
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise StoreError(f"bad artifact key {key!r}: use letters, digits, '.', '-' and '_' (no '..')")


def check_relpath(rel: str) -> None:
    if not _REL_RE.match(rel) or any(p in ("..", ".") for p in rel.split("/")):
        raise StoreError(f"bad file name in artifact: {rel!r}")


@dataclass
class Manifest:
    """The record that makes an artifact exist. Written last."""

    kind: str
    key: str
    files: list[dict]  # [{"path": rel, "size": int, "sha256": hex}]
    key_inputs: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)  # input name -> URI
    metrics: dict = field(default_factory=dict)
    created: float = 0.0
    producer: str = ""
    format: int = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            raw = json.loads(text)
            if raw.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {raw.get('format')!r}")
            m = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
            for f in m.files:
                check_relpath(f["path"])
                int(f["size"]), str(f["sha256"])
            return m
        except (ValueError, KeyError, TypeError, StoreError) as e:
            raise ArtifactCorrupt(f"{where}: invalid manifest ({e})") from None

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.files)


class ArtifactStore:
    """An fsspec-backed store rooted at `url` (e.g. `./rlhf-store`, `s3://bucket/prefix`).

    S3 credentials come from the environment/AWS config (never passed through or logged here); an
    S3-compatible endpoint comes from `endpoint_url` or `AWS_ENDPOINT_URL`.
    """

    def __init__(self, url: str, endpoint_url: str | None = None, cache_dir: str | Path | None = None):
        if "://" not in url:
            url = str(Path(url).expanduser().resolve())
        self.url = url.rstrip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if self.url.startswith("s3://"):
            opts["use_listings_cache"] = False
            if self.endpoint_url:
                opts["client_kwargs"] = {"endpoint_url": self.endpoint_url}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **opts)
        self.root = self.root.rstrip("/")
        self.is_local = self.fs.protocol in ("file", "local") or "file" in (self.fs.protocol or ())
        self.cache_dir = Path(cache_dir or os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache/rlhf_tasks/store")
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    @classmethod
    def from_config(cls, store_cfg) -> "ArtifactStore":
        return cls(store_cfg.url, endpoint_url=store_cfg.endpoint_url, cache_dir=store_cfg.cache_dir)

    def settings(self) -> dict:
        """What a stage job needs to reopen this store (no credentials)."""
        return {"url": self.url, "endpoint_url": self.endpoint_url, "cache_dir": str(self.cache_dir)}

    # ---- naming -------------------------------------------------------------------------------------------
    def _path(self, kind: str, key: str) -> str:
        check_name(kind, key)
        return f"{self.root}/{kind}/{key}"

    def uri(self, kind: str, key: str) -> str:
        check_name(kind, key)
        return f"{self.url}/{kind}/{key}"

    def parse_uri(self, uri: str) -> tuple[str, str]:
        """URI -> (kind, key); the URI must lie under this store's root."""
        u = uri.rstrip("/")
        if "://" not in u and not u.startswith(self.url):
            u = str(Path(u).expanduser().resolve())
        if not u.startswith(self.url + "/"):
            raise StoreError(f"{uri} is not inside the store {self.url}")
        rest = u[len(self.url) + 1 :].split("/")
        if len(rest) != 2:
            raise StoreError(f"{uri} is not an artifact URI (<store>/<kind>/<key>)")
        check_name(rest[0], rest[1])
        return rest[0], rest[1]

    # ---- manifest / existence -----------------------------------------------------------------------------
    def read_manifest(self, kind: str, key: str) -> Manifest | None:
        """The manifest, or None if the artifact does not exist (no manifest). Raises ArtifactCorrupt if invalid."""
        p = f"{self._path(kind, key)}/{MANIFEST}"
        try:
            with self.fs.open(p, "r") as f:
                text = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        m = Manifest.from_json(text, self.uri(kind, key))
        if m.kind != kind or m.key != key:
            raise ArtifactCorrupt(f"{self.uri(kind, key)}: manifest names {m.kind}/{m.key}")
        return m

    def exists(self, kind: str, key: str) -> bool:
        """True when a valid manifest exists and every listed file is present with its size (cheap check)."""
        try:
            self.verify(kind, key, deep=False)
            return True
        except (ArtifactCorrupt, FileNotFoundError):
            return False

    def verify(self, kind: str, key: str, deep: bool = True) -> Manifest:
        """Check the artifact against its manifest; `deep` re-hashes every file. Raises ArtifactCorrupt."""
        base = self._path(kind, key)
        m = self.read_manifest(kind, key)
        if m is None:
            raise ArtifactCorrupt(f"{self.uri(kind, key)}: no manifest (missing or unfinished upload)")
        for f in m.files:
            p = f"{base}/{f['path']}"
            try:
                size = self.fs.size(p)
            except FileNotFoundError:
                raise ArtifactCorrupt(f"{self.uri(kind, key)}: missing file {f['path']}") from None
            if size != int(f["size"]):
                raise ArtifactCorrupt(f"{self.uri(kind, key)}: {f['path']} has {size} bytes, manifest says {f['size']}")
            if deep:
                h = hashlib.sha256()
                with self.fs.open(p, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != f["sha256"]:
                    raise ArtifactCorrupt(f"{self.uri(kind, key)}: {f['path']} sha256 mismatch")
        return m

    # ---- put / get ----------------------------------------------------------------------------------------
    def put_dir(
        self,
        local_dir: str | Path,
        kind: str,
        key: str,
        *,
        key_inputs: dict | None = None,
        lineage: dict | None = None,
        metrics: dict | None = None,
    ) -> str:
        """Upload a folder as the artifact `<kind>/<key>` and commit it by writing the manifest last.

        Idempotent: if the artifact already exists it is left as is (content addressing) and its URI returned.
        """
        local_dir = Path(local_dir)
        base = self._path(kind, key)
        if self.exists(kind, key):
            return self.uri(kind, key)
        files = []
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(local_dir).as_posix()
                if rel == MANIFEST:
                    continue
                check_relpath(rel)
                files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
        # Leftovers of a crashed upload (no valid manifest) are removed before writing anew.
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)
        for f in files:
            target = f"{base}/{f['path']}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(local_dir / f["path"]), target)
        manifest = Manifest(
            kind=kind,
            key=key,
            files=files,
            key_inputs=key_inputs or {},
            lineage=lineage or {},
            metrics=metrics or {},
            created=time.time(),
            producer=producer_version(),
        )
        self._write_atomic(f"{base}/{MANIFEST}", manifest.to_json())
        return self.uri(kind, key)

    def _write_atomic(self, path: str, text: str) -> None:
        if self.is_local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # one object PUT is atomic on S3
            with self.fs.open(path, "w") as f:
                f.write(text)

    def get(self, kind: str, key: str, deep: bool = False) -> Path:
        """A local folder with the artifact's files. Local stores return the folder itself (size-checked, or
        re-hashed with `deep`); remote stores download once into the cache, verify every sha256, and reuse it."""
        m = self.verify(kind, key, deep=deep and self.is_local)
        if self.is_local:
            return Path(self._path(kind, key))
        target = self.cache_dir / _safe_dirname(self.url) / kind / key
        stamp = target / ".verified"
        digest = hashlib.sha256(m.to_json().encode()).hexdigest()
        if stamp.exists() and stamp.read_text() == digest:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
        try:
            base = self._path(kind, key)
            for f in m.files:
                dst = tmp / f["path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{base}/{f['path']}", str(dst))
                if sha256_file(dst) != f["sha256"]:
                    raise ArtifactCorrupt(f"{self.uri(kind, key)}: {f['path']} sha256 mismatch after download")
            (tmp / MANIFEST).write_text(m.to_json())
            (tmp / ".verified").write_text(digest)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def get_uri(self, uri: str, deep: bool = False) -> Path:
        return self.get(*self.parse_uri(uri), deep=deep)

    # ---- listing / deletion -------------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if _NAME_RE.match(n) and n not in RESERVED_KINDS)

    def keys(self, kind: str) -> list[str]:
        check_name(kind, "x")
        try:
            entries = self.fs.ls(f"{self.root}/{kind}", detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if _KEY_RE.match(n))

    def ls(self, kind: str | None = None) -> Iterator[tuple[str, str, Manifest | None]]:
        """Yield (kind, key, manifest or None for unfinished uploads / corrupt manifests)."""
        for k in [kind] if kind else self.kinds():
            for key in self.keys(k):
                try:
                    m = self.read_manifest(k, key)
                except ArtifactCorrupt:
                    m = None
                yield k, key, m

    def delete(self, kind: str, key: str) -> None:
        """Remove an artifact: the manifest first (so it stops existing at once), then its files."""
        base = self._path(kind, key)
        try:
            self.fs.rm(f"{base}/{MANIFEST}")
        except FileNotFoundError:
            pass
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)

    def gc(self, *, min_age_s: float = 3600.0, keep: set[str] | None = None, unreferenced: bool = False,
           dry_run: bool = False) -> list[str]:
        """Delete unfinished uploads older than `min_age_s`, checkpoints of stages whose final artifact exists,
        and (with `unreferenced`) complete artifacts that no other artifact's lineage and no `keep` URI names.
        Returns the URIs removed (or that would be, with `dry_run`)."""
        keep = set(keep or ()) | self._run_record_uris()
        entries = list(self.ls())
        complete = {(k, key): m for k, key, m in entries if m is not None}
        referenced = {u for m in complete.values() for u in m.lineage.values()} | keep
        doomed = []
        now = time.time()
        for kind, key, m in entries:
            uri = self.uri(kind, key)
            if m is None:
                if now - self._mtime(kind, key) >= min_age_s:
                    doomed.append((kind, key))
            elif kind.startswith("ckpt-"):
                stage_key = key.split(".step-")[0]
                if (kind[len("ckpt-"):], stage_key) in complete:
                    doomed.append((kind, key))
            elif unreferenced and uri not in referenced and not kind.startswith("_"):
                doomed.append((kind, key))
        if not dry_run:
            for kind, key in doomed:
                self.delete(kind, key)
        return [self.uri(k, key) for k, key in doomed]

    def _run_record_uris(self) -> set[str]:
        """Artifact URIs named by the run records under `runs/` (roots that `gc --unreferenced` keeps)."""
        uris: set[str] = set()
        try:
            paths = self.fs.glob(f"{self.root}/runs/*.json")
        except FileNotFoundError:
            return uris
        for p in paths:
            try:
                with self.fs.open(p, "r") as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            for stage in (record.get("stages") or {}).values():
                if isinstance(stage, dict) and isinstance(stage.get("uri"), str):
                    uris.add(stage["uri"])
        return uris

    def _mtime(self, kind: str, key: str) -> float:
        base = self._path(kind, key)
        newest = 0.0
        try:
            for info in self.fs.find(base, detail=True).values():
                t = info.get("mtime") or info.get("LastModified") or info.get("created")
                if hasattr(t, "timestamp"):
                    t = t.timestamp()
                newest = max(newest, float(t or 0))
        except FileNotFoundError:
            pass
        return newest

    # ---- small JSON documents beside artifacts (run records, progress) ------------------------------------
    def write_json(self, rel: str, obj: Any) -> str:
        check_relpath(rel)
        path = f"{self.root}/{rel}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str))
        return f"{self.url}/{rel}"

    def read_json(self, rel: str) -> Any:
        check_relpath(rel)
        with self.fs.open(f"{self.root}/{rel}", "r") as f:
            return json.load(f)


def _safe_dirname(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def open_store_for_uri(uri: str, endpoint_url: str | None = None) -> tuple[ArtifactStore, str, str]:
    """Open the store that holds an artifact URI `<root>/<kind>/<key>` -> (store, kind, key)."""
    u = uri.rstrip("/")
    if "://" not in u:
        u = str(Path(u).expanduser().resolve())
    parts = u.rsplit("/", 2)
    if len(parts) != 3:
        raise StoreError(f"{uri} is not an artifact URI (<store>/<kind>/<key>)")
    store = ArtifactStore(parts[0], endpoint_url=endpoint_url)
    check_name(parts[1], parts[2])
    return store, parts[1], parts[2]
