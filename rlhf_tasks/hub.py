"""Hugging Face Hub references pinned to commits: the revision a stage key records for a hub model or dataset.

A key that recorded "main" would reuse old artifacts forever after the repo changed upstream, so a hub reference is
resolved to a commit SHA when the plan is made:
  - a `revision` that is a full commit SHA is used as given;
  - online, the Hub says which commit the revision (default `main`) points to;
  - offline (HF_HUB_OFFLINE), or when the Hub cannot be reached, the commit the local Hugging Face cache's ref
    points to (`<HF_HUB_CACHE>/models--org--name/refs/<revision>`), which is also what loading would read;
  - otherwise ConfigError: one line naming the config field, before anything runs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")  # `org/name`, or a legacy single name (`gpt2`)
# What loading a model needs from a snapshot: configs, safetensors weights and tokenizer files (no pickles, no code).
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (its constant is fixed at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                or (Path(os.environ["HF_HOME"]) / "hub" if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE))


def cached_revision(name: str, revision: str, kind: str = "model") -> str | None:
    """The commit the local cache's ref `revision` of `name` points to, or None."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(hub_cache_dir())
    except (CacheNotFound, OSError, ValueError):
        return None
    for repo in info.repos:
        if repo.repo_id == name and repo.repo_type == kind and revision in repo.refs:
            return repo.refs[revision].commit_hash
    return None


def _online_revision(name: str, revision: str, kind: str) -> str | None:
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_info(name, revision=revision, repo_type=kind).sha
    except Exception:  # noqa: BLE001 - unreachable, unknown repo or revision, auth: fall back to the local cache
        return None


def resolve_hub_revision(name: str, revision: str | None = None, kind: str = "model", where: str = "models",
                         revision_field: str = "models.revision") -> str:
    """The commit SHA a hub `name` (kind `model` or `dataset`) at `revision` (default main) stands for.
    Raises ConfigError naming `where` when it cannot be known."""
    if revision and COMMIT_SHA.match(revision):
        return revision
    if not HUB_NAME.match(name):
        raise ConfigError(f"{where}: {name!r} is no local folder and no valid hub name")
    ref = revision or "main"
    sha = None if hub_offline() else _online_revision(name, ref, kind)
    sha = sha or cached_revision(name, ref, kind)
    if sha is None:
        how = "offline" if hub_offline() else "(the Hub did not answer and it is not in the local cache)"
        raise ConfigError(f"{where}: cannot resolve hub revision {ref!r} of {name} {how}; pin {revision_field} to "
                          f"a commit SHA, or download it first (hf download {name}"
                          f"{' --repo-type dataset' if kind == 'dataset' else ''})")
    return sha


def model_snapshot(name: str, sha: str) -> str:
    """The local folder of hub model `name` at commit `sha` (downloaded unless cached; offline: the cache only),
    so a stage loads exactly the commit its key names."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=sha, allow_patterns=list(MODEL_FILES), cache_dir=hub_cache_dir())
    except Exception as e:  # noqa: BLE001 - offline cache miss, network, auth: one line for the user
        raise ConfigError(f"models: cannot load {name} at commit {sha[:12]}: {str(e).splitlines()[0][:200]}") from None
