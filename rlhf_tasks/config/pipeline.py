"""The whole pipeline's config: models, store, execution and one section per stage; YAML + dotted overrides."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ..errors import ConfigError
from . import rules
from ._base import Section
from .methods import METHODS
from .stages import DataConfig, DPOConfig, EvalConfig, PPOConfig, RewardConfig, SFTConfig

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
MIN_TIMEOUT_S = 60.0


TINY_ARCHS = ("llama", "opt")  # the `tiny:<arch>` model references (rlhf_tasks.models builds them)


class TinyModelConfig(Section):
    """Shape of the tiny models built locally for `tiny:<arch>` model references (tests, demo)."""

    hidden_size: int = Field(64, ge=8, description="Hidden size.")
    num_layers: int = Field(2, ge=1, description="Transformer layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    intermediate_size: int = Field(256, ge=8, description="MLP width.")
    vocab_size: int = Field(512, ge=64, description="Vocabulary of the locally trained BPE tokenizer.")
    max_position_embeddings: int = Field(256, ge=16, description="Longest sequence.")
    seed: int = Field(0, description="Seed of the random init.")

    @model_validator(mode="after")
    def _heads_divide(self):
        rules.reject(rules.tiny_model_rules(self))
        return self


class ModelsConfig(Section):
    """Where the actor and the reward model start from."""

    actor: str = Field(
        "tiny:llama",
        description="Actor base: `tiny:llama` / `tiny:opt` (built locally), `smollm2-135m` (offline GGUF package), "
        "a local HF folder, a hub name, or a store URI.",
    )
    reward: str | None = Field(None, description="Reward-model base (same forms as actor); default: the actor's.")
    tokenizer: str | None = Field(None, description="Tokenizer (default: the actor's).")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of `tiny:` models.")
    revision: str | None = Field(None, description="Hub revision for hub model names.")


class StoreConfig(Section):
    """The fsspec artifact store. Credentials come from the environment (AWS_*), never from this file."""

    url: str = Field("./rlhf-store", description="Root URL: a local folder or s3://bucket/prefix.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto); default: AWS_ENDPOINT_URL or AWS's."
    )
    cache_dir: str | None = Field(None, description="Local download cache (default: ~/.cache/rlhf_tasks/store).")


class ExecutionConfig(Section):
    """Where and how stage jobs run. Not part of any stage key except `num_procs`."""

    launcher: Literal["auto", "torchrun", "deepspeed", "none"] = Field(
        "auto", description="auto: none for 1 process, torchrun for more on one node, deepspeed for multi-node."
    )
    num_procs: int = Field(1, ge=1, description="Processes (GPUs, or CPU ranks with gloo) per node.")
    num_nodes: int = Field(1, ge=1, description="Nodes (multi-node uses the deepspeed launcher and a hostfile).")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node.")
    multinode_runner: Literal["pdsh", "openmpi", "mvapich", "slurm"] = Field(
        "pdsh", description="DeepSpeed multi-node runner."
    )
    timeout_s: float = Field(
        3600.0, ge=MIN_TIMEOUT_S,
        description=f"Per-stage wall-clock limit; the job's process group is killed (at least {MIN_TIMEOUT_S:.0f} s: "
        "a job spends its first seconds importing torch and DeepSpeed).",
    )
    retries: int = Field(3, ge=0, description="Retries of a failed stage job (it resumes from its last checkpoint); "
                         "bad input found inside a job is never retried.")
    retry_delay_s: float = Field(10.0, ge=0, description="Delay before the first retry, doubling each time (default "
                                 "10, 20, 40 s: rides out a minute of store outage).")
    max_parallel_stages: int | None = Field(
        None, ge=1,
        description="Stage jobs running at the same time where the plan allows it (SFT and the reward model after the "
        "data; a sweep's variants). Empty: what fits the machine (rlhf_tasks/devices.py): one job per num_procs GPUs "
        "on a GPU node (each gets its own GPUs), one per 8 CPU cores on a CPU box (1 on a small one), 4 with a work "
        "pool, 1 for multi-node jobs.",
    )
    work_pool: str | None = Field(None, description="Run training stages as flow runs of train-stage on this pool.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Accelerator for stage jobs.")
    train_deployment: str | None = Field(
        None, description="Deployment that runs training stages when work_pool is set (default: train-stage/<work_pool>)."
    )
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Job variables for train-stage flow runs on the work pool (e.g. {gpu_count: 8, image: ...}).",
    )
    runs_dir: str = Field(
        "./rlhf-runs",
        description="Local folder for stage job scratch space and logs (<runs_dir>/<run name>-<run id>/<stage>/; "
        "after a commit only spec.json and the log stay).",
    )


class PipelineConfig(Section):
    """Everything a pipeline run needs. The same object is the CLI's config, YAML files and the Prefect form."""

    experiment: str = Field("demo", description="Experiment name (flow run names, report titles).")
    method: Literal[tuple(METHODS)] = Field(  # type: ignore[valid-type]  (the choices are the table's rows)
        "ppo",
        description="The alignment method, which picks the pipeline's stages (rlhf_tasks/config/methods.py): "
        "ppo = data -> sft -> reward -> ppo -> eval; grpo / rloo = the same with the critic-free stage grpo / rloo "
        "(ppo.samples_per_prompt >= 2; with ppo.reward=fn that stage does not read the reward model); dpo = data "
        "-> sft -> reward -> dpo -> eval, where dpo trains the SFT policy on the reward phase's pairs (section "
        "dpo) and the reward model serves only evaluation. Stages a method shares with another (data, sft, reward) "
        "have the same keys, so switching reuses them from the store: `rlhf run --set method=...`.",
    )
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Base models.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Artifact store.")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description="Job placement.")
    data: DataConfig = Field(default_factory=DataConfig, description="Step 0: data blend.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Step 1: SFT.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Step 2: reward model.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="Step 3: PPO (method: ppo, grpo, rloo).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO on the preference pairs (method: dpo).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and report.")

    @model_validator(mode="after")
    def _sections_agree(self):
        rules.reject(rules.pipeline_rules(self))
        return self


def set_dotted(tree: dict, dotted: str, value: Any, origin: str = "--set") -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{origin} {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = nxt
    node[keys[-1]] = value


DOTTED_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # `ppo.kl_coef`


def parse_value(raw: str) -> Any:
    """A value typed on the command line, parsed as YAML (numbers, bools, lists); `1e-3` is a number too."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return value


def parse_override(item: str, origin: str = "--set") -> tuple[str, Any]:
    """`ppo.kl_coef=0.05` -> ("ppo.kl_coef", 0.05); the value is parsed as YAML (numbers, bools, lists).
    `origin` names where the item came from in messages (`--set` on the CLI, `overrides` in a flow run)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{origin} {item!r}: expected KEY=VALUE, e.g. ppo.kl_coef=0.05")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not DOTTED_KEY.fullmatch(key):
        raise ConfigError(f"{origin} {item!r}: bad key {key!r}")
    return key, parse_value(raw)


def apply_overrides(tree: dict, overrides: list[str], origin: str = "--set") -> list[str]:
    """Apply `KEY=VALUE` items to a config tree in place; returns the keys set. `origin`: see parse_override."""
    keys = []
    for item in overrides:
        key, value = parse_override(item, origin)
        set_dotted(tree, key, value, origin)
        keys.append(key)
    return keys


def _error_fields(first: dict) -> list[str]:
    """The dotted paths an error is about: the fields a cross-field rule names, else the error's location."""
    if first["type"] == "cross_field":
        return first["ctx"]["fields"]
    return [".".join(str(p) for p in first["loc"])]


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "cross_field":
        return f"{origin}: {first['ctx']['message']}{more}"
    loc = ".".join(str(p) for p in first["loc"])
    msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    return f"{origin}: {loc}: {msg}{more}"


def preset_path(name: str) -> Path:
    """Path of a shipped preset (`tiny`, `smollm2-135m`, `opt-1.3b`, ...)."""
    p = PRESETS_DIR / f"{name}.yaml"
    if not p.exists():
        known = ", ".join(sorted(x.stem for x in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name!r} (known: {known})")
    return p


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first_line[key]})", key_node.start_mark)
            first_line.setdefault(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file (--config takes a YAML file or a preset name)")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as UTF-8 text ({type(e).__name__})") from None
    except yaml.MarkedYAMLError as e:
        line = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a config: the file (a path or a preset name; default: the `tiny` preset), then `--set` overrides.

    Unknown keys and wrong types raise ConfigError with one line naming the key.
    """
    if path is None:
        path = preset_path("tiny")
    elif not Path(path).exists() and re.fullmatch(r"[\w.\-]+", str(path)) and (PRESETS_DIR / f"{path}.yaml").exists():
        path = preset_path(str(path))
    tree = read_yaml(path)
    return config_from_dict(tree, str(path), overrides or [])


def config_from_dict(tree: dict, origin: str = "config", overrides: list[str] | None = None,
                     overrides_origin: str = "--set") -> PipelineConfig:
    """Validate a plain dict (e.g. Prefect parameters) with the same one-line errors as files, after applying
    `overrides` (`KEY=VALUE` items) to it in place. An error about a key the overrides set names
    `overrides_origin` (`--set`, or the flow's `overrides` parameter); any other names `origin`."""
    set_keys = apply_overrides(tree, overrides or [], overrides_origin)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        fields = _error_fields(e.errors()[0])
        by_set = any(f == k or f.startswith(k + ".") for f in fields for k in set_keys)
        raise ConfigError(_format_error(e, overrides_origin if by_set else origin)) from None
