"""Where Prefect keeps the stage tasks' cache records: inside the artifact store, under its own prefix.

`<store>/_prefect/cache/<record key>`: any run, on any machine, with any Prefect database, that points at the same
store sees the same records. The prefix is fixed and used for nothing else (mixing record layouts under one prefix
corrupts the cache). The `_` keeps it out of `rlhf store ls`; `gc` only removes records naming no artifact.

Local stores use a plain path. Remote stores use a RemoteFileSystem block that is (re)saved on the current Prefect
API at each run (Prefect only accepts saved blocks as result storage). The block holds no credentials: s3fs reads
them from the environment, like the store itself.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from rlhf_tasks.store import CACHE_RECORDS, ArtifactStore

CACHE_PREFIX = CACHE_RECORDS  # defined by the store, whose gc removes records that name no artifact


def cache_location(store: ArtifactStore) -> str:
    return f"{store.url}/{CACHE_PREFIX}"


def block_name(store: ArtifactStore) -> str:
    return "rlhf-cache-" + hashlib.sha256(store.url.encode()).hexdigest()[:12]


def result_storage_for(store: ArtifactStore) -> Path | str:
    """A value for a task's `result_storage`: a Path (local store) or the slug of a saved block (remote)."""
    if store.is_local:
        path = Path(store.root) / CACHE_PREFIX
        path.mkdir(parents=True, exist_ok=True)
        return path
    from prefect.filesystems import RemoteFileSystem

    settings: dict = {"use_listings_cache": False}
    if store.endpoint_url:
        settings["client_kwargs"] = {"endpoint_url": store.endpoint_url}
    name = block_name(store)
    RemoteFileSystem(basepath=cache_location(store), settings=settings).save(name, overwrite=True)
    return f"remote-file-system/{name}"
