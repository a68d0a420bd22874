"""Content-addressed artifact store over fsspec (local folder, s3:// through s3fs, any fsspec URL).

An artifact lives at `<root>/<kind>/<key>/`. Its files are uploaded first and `manifest.json` (file list with sizes
and sha256, the key and what it was computed from, lineage, producer, created time, metrics) is written LAST: an
artifact without a valid manifest does not exist, so a crash at any point of an upload never leaves something that
verifies. Committed artifacts are immutable.

An artifact is trusted (a cache hit, an input handed to a stage) only after its files match the manifest's sha256.
So that re-checking a large unchanged artifact costs a stat instead of a read, the sha256 of each file version is
remembered outside the artifact, in the local cache (`FileHashes`).
"""
from __future__ import annotations

import contextlib
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
RESERVED_KINDS = frozenset({"runs", "sweeps"})  # folders of plain documents beside the artifacts (run records,
# sweep reports): never listed or collected as artifacts
CACHE_RECORDS = "_prefect/cache"  # the orchestrator's cache records (flows/storage.py); each names an artifact URI
MISSING = "missing"  # `ArtifactStore.check` of an artifact without a manifest
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


def cache_root() -> Path:
    """The local cache folder (tiny models, downloads of remote artifacts, remembered file hashes)."""
    return Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache/rlhf_tasks")


def sha256_stream(f, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def local_version(path: str | Path) -> dict:
    """What changes whenever a local file's bytes change. ctime is set by the kernel on every write and cannot be
    set back, so even a rewrite that restores the mtime counts as a new version."""
    st = os.stat(path)
    return {"file": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


class FileHashes:
    """The sha256 of file versions hashed before, so re-checking an unchanged file costs a stat, not a read.

    A version is a dict that changes whenever the bytes do (`local_version`; on S3 the URL, ETag and size). One small
    record per version, `<folder>/<2 hex>/<62 hex>` holding the sha256, written atomically: processes sharing the
    cache need no lock, and a lost or unwritable record only costs a re-hash. It lives outside the artifacts."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _record(self, version: dict) -> Path:
        h = hashlib.sha256(canonical_json(version).encode()).hexdigest()
        return self.folder / h[:2] / h[2:]

    def lookup(self, version: dict) -> str | None:
        try:
            text = self._record(version).read_text()
        except OSError:
            return None
        return text if re.fullmatch(r"[0-9a-f]{64}", text) else None

    def remember(self, version: dict, sha256: str) -> None:
        rec = self._record(version)
        try:
            rec.parent.mkdir(parents=True, exist_ok=True)
            tmp = rec.with_name(f".{rec.name}.{uuid.uuid4().hex}")
            tmp.write_text(sha256)
            os.replace(tmp, rec)
        except OSError:
            pass

    def sha256(self, version: dict | None, read, deep: bool = False) -> str:
        """The sha256 of `version`: remembered, or (and always when `deep`) `read()` -> hex, then remembered."""
        sha = None if deep or version is None else self.lookup(version)
        if sha is None:
            sha = read()
            if version is not None:
                self.remember(version, sha)
        return sha

    def local_sha256(self, path: str | Path, deep: bool = False) -> str:
        return self.sha256(local_version(path), lambda: sha256_file(path), deep)


def is_remote(path: str) -> bool:
    """A path that is an fsspec URL (`s3://...`, `gs://...`), not a local path (nor a hub name)."""
    return "://" in path and not path.startswith("file://")


def open_fs(url: str, endpoint_url: str | None = None):
    """(fsspec filesystem, path) of `url` with the store's rules, for the store and for data sources alike: S3
    through s3fs without listing caches (other processes write), at `endpoint_url` (default AWS_ENDPOINT_URL) when
    one is set; credentials from the environment, never passed here. ValueError/ImportError: an unknown scheme,
    or one whose package is not installed."""
    opts: dict[str, Any] = {}
    if url.startswith("s3://"):
        opts["use_listings_cache"] = False
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint_url:
            opts["client_kwargs"] = {"endpoint_url": endpoint_url}
    return fsspec.core.url_to_fs(url, **opts)


def default_hashes() -> FileHashes:
    """The hash memory for files outside any store (data sources, local model folders)."""
    return FileHashes(cache_root() / "sha256")


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
        try:
            self.fs, self.root = open_fs(self.url, self.endpoint_url)
        except (ValueError, ImportError) as e:  # an unknown scheme, or one whose package is not installed
            raise StoreError(f"store {url}: {str(e).splitlines()[0]} (use a local folder or s3://bucket/prefix)") \
                from None
        self.root = self.root.rstrip("/")
        self.is_local = self.fs.protocol in ("file", "local") or "file" in (self.fs.protocol or ())
        self.cache_dir = Path(cache_dir or cache_root() / "store")
        self.hashes = FileHashes(self.cache_dir / "sha256")
        # Nothing is created here: reading a store that does not exist (a typo) must not make it.

    def require_existing(self) -> "ArtifactStore":
        """Raise StoreError unless the store exists (a local folder; the S3 bucket): for commands that only read."""
        try:
            ok = os.path.isdir(self.root) if self.is_local else self.fs.exists(self.root.split("/", 1)[0])
        except OSError as e:
            raise StoreError(f"store {self.url}: cannot reach it ({e})") from None
        if not ok:
            raise StoreError(f"store {self.url} does not exist")
        return self

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
        _refuse_dotdot(uri)
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
        """True when the artifact exists and its files match the manifest by content (see `verify`)."""
        return self.check(kind, key) is None

    def check(self, kind: str, key: str) -> str | None:
        """None when the artifact exists and verifies; MISSING without a manifest; else what is wrong."""
        try:
            if self.read_manifest(kind, key) is None:
                return MISSING
            self.verify(kind, key, deep=False)
            return None
        except ArtifactCorrupt as e:
            return str(e)

    def verify(self, kind: str, key: str, deep: bool = True) -> Manifest:
        """Check every file against the manifest: present, same size, same sha256. Without `deep`, a file version
        hashed before (`FileHashes`) is not read again; `deep` re-reads every byte. Raises ArtifactCorrupt."""
        base = self._path(kind, key)
        m = self.read_manifest(kind, key)
        if m is None:
            raise ArtifactCorrupt(f"{self.uri(kind, key)}: no manifest (missing or unfinished upload)")
        infos = self._file_infos(base, m)
        for f in m.files:
            info = infos.get(f["path"])
            if info is None:
                raise ArtifactCorrupt(f"{self.uri(kind, key)}: missing file {f['path']}")
            if int(info["size"]) != int(f["size"]):
                raise ArtifactCorrupt(f"{self.uri(kind, key)}: {f['path']} has {info['size']} bytes, "
                                      f"manifest says {f['size']}")
            if self._sha256(f"{base}/{f['path']}", info, deep) != f["sha256"]:
                raise ArtifactCorrupt(f"{self.uri(kind, key)}: {f['path']} sha256 mismatch")
        return m

    def _file_infos(self, base: str, m: Manifest) -> dict[str, dict]:
        """{relative path: fsspec info} of an artifact's files (local: a stat each; remote: one listing)."""
        if self.is_local:
            out = {}
            for f in m.files:
                try:
                    out[f["path"]] = {"size": os.stat(f"{base}/{f['path']}").st_size}
                except (FileNotFoundError, NotADirectoryError):
                    pass
            return out
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(base) + 1:]: info for p, info in found.items() if p.startswith(base + "/")}

    def _version(self, path: str, info: dict) -> dict | None:
        if self.is_local:
            return local_version(path)
        etag = info.get("ETag") or info.get("etag")
        url = self.url + path[len(self.root):]
        return {"url": url, "etag": etag, "size": int(info["size"])} if etag else None

    def _sha256(self, path: str, info: dict, deep: bool) -> str:
        def read() -> str:
            with self.fs.open(path, "rb") as fh:
                return sha256_stream(fh)

        return self.hashes.sha256(self._version(path, info), read, deep)

    def _remember_written(self, base: str, files: list[dict]) -> None:
        """Record the versions just uploaded with the sha256 hashed from their sources, so the first check of a
        fresh artifact reads nothing."""
        infos = self._file_infos(base, Manifest("", "", files))
        for f in files:
            if f["path"] in infos:
                version = self._version(f"{base}/{f['path']}", infos[f["path"]])
                if version is not None:
                    self.hashes.remember(version, f["sha256"])

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
        if kind in RESERVED_KINDS:
            raise StoreError(f"artifact kind {kind!r} is reserved (the store's {kind}/ folder holds other documents)")
        if self.exists(kind, key):
            return self.uri(kind, key)
        rels = []
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(local_dir).as_posix()
                if rel == MANIFEST:
                    continue
                check_relpath(rel)
                rels.append(rel)
        # Leftovers of a crashed upload (no valid manifest), or a corrupted artifact, are removed before writing anew.
        self.delete(kind, key)
        files = []
        for rel in rels:
            target = f"{base}/{rel}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            size, sha = self._upload_hashed(local_dir / rel, target)
            files.append({"path": rel, "size": size, "sha256": sha})
        self._remember_written(base, files)
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
        self.fs.makedirs(base, exist_ok=True)  # an artifact without files still gets its folder
        self._write_atomic(f"{base}/{MANIFEST}", manifest.to_json())
        return self.uri(kind, key)

    def _upload_hashed(self, src: Path, target: str, chunk: int = 1 << 20) -> tuple[int, str]:
        """Copy one file into the store and return (size, sha256) of the bytes written. Hashing the bytes as they
        are written, not the source before the copy, keeps the manifest true even when a writer (a TensorBoard
        thread still flushing, say) changes the source in between. -> (bytes written, hex digest)"""
        h, size = hashlib.sha256(), 0
        with open(src, "rb") as fin, self.fs.open(target, "wb") as fout:
            for block in iter(lambda: fin.read(chunk), b""):
                h.update(block)
                fout.write(block)
                size += len(block)
        return size, h.hexdigest()

    def _write_atomic(self, path: str, text: str | bytes) -> None:
        mode = "wb" if isinstance(text, bytes) else "w"
        if self.is_local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, mode) as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:  # a full disk, an interrupt: no half-written temporary file stays behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:  # one object PUT is atomic on S3
            with self.fs.open(path, mode) as f:
                f.write(text)

    def get(self, kind: str, key: str, deep: bool = False) -> Path:
        """A local folder with the artifact's files, checked by content (sha256) against the manifest, so a stage
        never reads a corrupted input. Local stores return the folder itself; remote stores download once into the
        cache and check the local copy on every later call. `deep` re-reads every byte. Raises ArtifactCorrupt."""
        if self.is_local:
            self.verify(kind, key, deep=deep)
            return Path(self._path(kind, key))
        m = self.read_manifest(kind, key)
        if m is None:
            raise ArtifactCorrupt(f"{self.uri(kind, key)}: no manifest (missing or unfinished upload)")
        target = self.cache_dir / _safe_dirname(self.url) / kind / key
        stamp = target / ".verified"
        digest = hashlib.sha256(m.to_json().encode()).hexdigest()
        if stamp.exists() and stamp.read_text() == digest and self._local_copy_matches(target, m, deep):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
        try:
            base = self._path(kind, key)
            infos = self._file_infos(base, m)
            for f in m.files:
                dst = tmp / f["path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{base}/{f['path']}", str(dst))
                if sha256_file(dst) != f["sha256"]:
                    raise ArtifactCorrupt(f"{self.uri(kind, key)}: {f['path']} sha256 mismatch after download")
                version = self._version(f"{base}/{f['path']}", infos.get(f["path"], {"size": f["size"]}))
                if version is not None:  # the remote object, as listed before the download, is known good now
                    self.hashes.remember(version, f["sha256"])
            (tmp / MANIFEST).write_text(m.to_json())
            (tmp / ".verified").write_text(digest)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        for f in m.files:
            self.hashes.remember(local_version(target / f["path"]), f["sha256"])
        return target

    def _local_copy_matches(self, folder: Path, m: Manifest, deep: bool) -> bool:
        for f in m.files:
            p = folder / f["path"]
            if not p.is_file() or p.stat().st_size != int(f["size"]) \
                    or self.hashes.local_sha256(p, deep) != f["sha256"]:
                return False
        return True

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
        """Delete unfinished uploads and cache records that name no existing artifact (left by failed stage runs)
        older than `min_age_s`, checkpoints of stages whose final artifact exists, and (with `unreferenced`)
        complete artifacts that no other artifact's lineage and no `keep` URI names.
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
        records = self._stale_cache_records(min_age_s, now)
        if not dry_run:
            for kind, key in doomed:
                self.delete(kind, key)
            for path in records:
                self.fs.rm(path)
        return [self.uri(k, key) for k, key in doomed] + [self.url + p[len(self.root):] for p in records]

    def _stale_cache_records(self, min_age_s: float, now: float) -> list[str]:
        """Paths of the records under CACHE_RECORDS older than `min_age_s` whose result is not the URI of an
        artifact that exists: a failed task's record (random name, an exception inside) or one whose artifact
        was deleted. The flow ignores both (the store is the truth), so removing them changes nothing but space."""
        try:
            found = self.fs.find(f"{self.root}/{CACHE_RECORDS}", detail=True)
        except FileNotFoundError:
            return []
        stale = []
        for path, info in sorted(found.items()):
            if now - _info_mtime(info) >= min_age_s and not self._record_names_artifact(path):
                stale.append(path)
        return stale

    def _record_names_artifact(self, path: str) -> bool:
        try:
            with self.fs.open(path, "r") as f:
                uri = json.loads(json.load(f)["result"])
            return isinstance(uri, str) and self.read_manifest(*self.parse_uri(uri)) is not None
        except (OSError, ValueError, KeyError, TypeError, StoreError):
            return False

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
        try:
            return max((_info_mtime(info) for info in self.fs.find(base, detail=True).values()), default=0.0)
        except FileNotFoundError:
            return 0.0

    # ---- small JSON documents beside artifacts (run records, progress) ------------------------------------
    def write_json(self, rel: str, obj: Any) -> str:
        check_relpath(rel)
        path = f"{self.root}/{rel}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str))
        return f"{self.url}/{rel}"

    def write_file(self, rel: str, data: bytes) -> str:
        """A small document (a report, a plot) at `<store>/<rel>`, written whole or not at all."""
        check_relpath(rel)
        path = f"{self.root}/{rel}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._write_atomic(path, data)
        return f"{self.url}/{rel}"

    def read_json(self, rel: str) -> Any:
        check_relpath(rel)
        with self.fs.open(f"{self.root}/{rel}", "r") as f:
            return json.load(f)


def _info_mtime(info: dict) -> float:
    t = info.get("mtime") or info.get("LastModified") or info.get("created")
    return float(t.timestamp() if hasattr(t, "timestamp") else t or 0)


def _refuse_dotdot(uri: str) -> None:
    """`..` in an artifact URI would be resolved away before the name checks ever saw it: refuse it outright."""
    if ".." in uri.replace("\\", "/").split("/"):
        raise StoreError(f"{uri}: '..' is not allowed in an artifact URI")


def _safe_dirname(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def open_store_for_uri(uri: str, endpoint_url: str | None = None) -> tuple[ArtifactStore, str, str]:
    """Open the store that holds an artifact URI `<root>/<kind>/<key>` -> (store, kind, key)."""
    u = uri.rstrip("/")
    _refuse_dotdot(uri)
    if "://" not in u:
        u = str(Path(u).expanduser().resolve())
    parts = u.rsplit("/", 2)
    if len(parts) != 3:
        raise StoreError(f"{uri} is not an artifact URI (<store>/<kind>/<key>)")
    store = ArtifactStore(parts[0], endpoint_url=endpoint_url)
    check_name(parts[1], parts[2])
    return store, parts[1], parts[2]
