"""The one stage key rule, the stage spec contract, and the plan.

A stage is a pure function of (its config slice, the keys of its input artifacts, its code version). Its key is
the hash of those; its artifact lives at `<store>/<stage>/<key>/`. Caching, reuse across experiments and plan's
"why does this re-run" all follow from `stage_key_inputs`, so it lives here and nowhere else.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .config.methods import STEP3, eval_inputs, pipeline_stages, policy_reads_reward_model
from .config.rules import CRITIC_FIELDS, CRITIC_FREE
from .provenance import code_hashes, library_versions
from .store import MISSING, ArtifactStore, compute_key, is_remote

STAGES = ("data", "sft", "reward", "ppo", "eval")  # the default method's (ppo) stages; a run has its method's


@dataclass(frozen=True)
class StageDef:
    name: str
    inputs: tuple[str, ...]  # upstream stages whose artifact keys enter this key (eval's: `stage_inputs`)
    module: str  # python module with `run(spec)`; launched as a job
    distributed: bool  # launched under the DeepSpeed launcher (else a plain single process)
    accelerated: bool = True  # runs on the job's accelerator (its GPUs are leased to it while it runs)


STAGE_DEFS: dict[str, StageDef] = {
    "data": StageDef("data", (), "rlhf_tasks.data.stage", False, accelerated=False),
    "sft": StageDef("sft", ("data",), "rlhf_tasks.training.sft", True),
    "reward": StageDef("reward", ("data",), "rlhf_tasks.training.reward", True),
    "ppo": StageDef("ppo", ("data", "sft", "reward"), "rlhf_tasks.ppo.stage", True),
    # critic-free step 3, the same stage module (its job reads the method from the stage name)
    "grpo": StageDef("grpo", ("data", "sft", "reward"), "rlhf_tasks.ppo.stage", True),
    "rloo": StageDef("rloo", ("data", "sft", "reward"), "rlhf_tasks.ppo.stage", True),
    # DPO: the SFT policy trained on the data artifact's reward-phase pairs, no reward model
    "dpo": StageDef("dpo", ("data", "sft"), "rlhf_tasks.training.dpo", True),
    "eval": StageDef("eval", (), "rlhf_tasks.evaluation.stage", False),  # inputs by method: config.methods
}
JOB_ENTRY = "rlhf_tasks.stage_main"  # every job starts here, then imports its stage module
ALL_STAGES = tuple(STAGE_DEFS)  # every stage there is (`--until` takes any of them that the method runs)


def stage_inputs(cfg: PipelineConfig, stage: str) -> tuple[str, ...]:
    """The upstream stages of `stage` in a run of `cfg`: their keys enter its key, their URIs its spec. Only the
    eval stage's depend on the config (the policy it compares with SFT is the method's; the reward model only when
    it scores), and they are given by the method table (config/methods.py)."""
    if stage == "eval":
        return eval_inputs(cfg)
    if stage in STEP3 and not policy_reads_reward_model(cfg):  # e.g. grpo scored by ppo.reward_fn alone
        return tuple(i for i in STAGE_DEFS[stage].inputs if i != "reward")
    return STAGE_DEFS[stage].inputs


def code_version(stage: str) -> dict[str, str]:
    """{file: code hash} of every module of ours the stage's job can execute (provenance.import_closure)."""
    return code_hashes([JOB_ENTRY, STAGE_DEFS[stage].module])


def _model(cfg: PipelineConfig, field: str) -> dict:
    """model_identity of `models.<field>` (tokenizer and reward default to the actor), named for messages."""
    from .models import model_identity

    m = cfg.models
    ref, where = getattr(m, field), f"models.{field}"
    if ref is None:
        ref, where = m.actor, "models.actor"
    return model_identity(ref, m.tiny, m.revision, where)


def config_slice(cfg: PipelineConfig, stage: str) -> dict:
    """The part of the config that determines a stage's output (placement, timeouts and the store do not)."""
    if stage == "data":
        data = cfg.data.model_dump(mode="json", by_alias=True)
        for src in data["sources"]:  # files enter the key by content (fingerprints), not by where they lie
            if is_remote(src["path"]):
                src["path"] = src["path"].rstrip("/").rsplit("/", 1)[-1]
            elif Path(src["path"]).is_absolute():
                src["path"] = Path(src["path"]).name
        return {"data": data, "tokenizer": _model(cfg, "tokenizer")}
    if stage == "sft":
        return {"sft": cfg.sft.model_dump(mode="json"), "actor": _model(cfg, "actor"),
                "num_procs": cfg.execution.num_procs}
    if stage == "reward":
        return {"reward": cfg.reward.model_dump(mode="json"), "base": _model(cfg, "reward"),
                "num_procs": cfg.execution.num_procs}
    if stage == "ppo":
        return {"ppo": cfg.ppo.model_dump(mode="json"), "num_procs": cfg.execution.num_procs}
    if stage == "dpo":  # the models enter through the sft input's key (DPO starts from that artifact)
        return {"dpo": cfg.dpo.model_dump(mode="json"), "num_procs": cfg.execution.num_procs}
    if stage in CRITIC_FREE:  # the critic's settings do not shape a critic-free run: not in its key
        ppo = {k: v for k, v in cfg.ppo.model_dump(mode="json").items() if k not in CRITIC_FIELDS}
        return {"ppo": ppo, "num_procs": cfg.execution.num_procs}
    if stage == "eval":
        return {"eval": cfg.eval.model_dump(mode="json")}
    raise KeyError(stage)


def hub_pins(key_inputs: dict) -> dict[str, str]:
    """{hub model name: commit SHA} as a stage key recorded them at plan time. A job loads exactly these commits,
    even if the repo moved between the plan and the job's start (a queued GPU job can start hours later)."""
    return {v["hub"]: v["revision"] for v in key_inputs.get("config", {}).values()
            if isinstance(v, dict) and isinstance(v.get("hub"), str) and isinstance(v.get("revision"), str)}


def reward_fn_ref(cfg: PipelineConfig, stage: str) -> tuple[str, str] | None:
    """(config field, `package.module:callable`) of the programmatic reward a stage scores with, if any."""
    if stage in STEP3 and cfg.ppo.reward != "rm" and cfg.ppo.reward_fn:
        return "ppo.reward_fn", cfg.ppo.reward_fn
    if stage == "eval" and cfg.eval.reward_fn:
        return "eval.reward_fn", cfg.eval.reward_fn
    return None


def data_source_fingerprints(cfg: PipelineConfig) -> list[dict]:
    from .data.sources import fingerprint_source  # content hash of files (local or at a URL); hub name + revision

    return [fingerprint_source(s, f"data.sources[{i}]", cfg.store.endpoint_url)
            for i, s in enumerate(cfg.data.sources)]


def stage_key_inputs(cfg: PipelineConfig, stage: str, input_keys: dict[str, str],
                     fingerprints: list[dict] | None = None) -> dict:
    """Everything that determines a stage's artifact. The stage key is `compute_key` of this."""
    ki: dict[str, Any] = {
        "stage": stage,
        "code": code_version(stage),
        "libraries": library_versions(),
        "config": config_slice(cfg, stage),
        "inputs": {name: input_keys[name] for name in stage_inputs(cfg, stage)},
    }
    if stage == "data":
        ki["sources"] = fingerprints if fingerprints is not None else data_source_fingerprints(cfg)
    fn = reward_fn_ref(cfg, stage)
    if fn is not None:  # code outside the stage's import closure (imported by name): its own code hashes
        from .reward_fn import code_identity

        ki["reward_fn"] = code_identity(fn[1], fn[0])
    return ki


@dataclass
class StagePlan:
    """One line of `rlhf plan`: the stage's key and URI, whether it is cached, and why it (re)runs."""

    stage: str
    key: str
    uri: str
    cached: bool
    reason: str
    key_inputs: dict = field(repr=False, default_factory=dict)
    input_uris: dict = field(default_factory=dict)


def plan(cfg: PipelineConfig, store: ArtifactStore, until: str = "eval") -> list[StagePlan]:
    """Compute the key of every stage of the config's method (`config.methods.pipeline_stages`) in order and
    check the store. Each StagePlan names its inputs' URIs (`input_uris`: what a scheduler waits for). Runs
    nothing, starts no job."""
    active = pipeline_stages(cfg)
    if until not in active:
        from .errors import ConfigError

        if until in ALL_STAGES:
            raise ConfigError(f"--until: stage {until!r} is not part of method={cfg.method} (its stages: "
                              f"{', '.join(active)})")
        raise ConfigError(f"--until: unknown stage {until!r} (one of {', '.join(ALL_STAGES)})")
    keys: dict[str, str] = {}
    uris: dict[str, str] = {}
    out: list[StagePlan] = []
    for stage in active[: active.index(until) + 1]:
        ki = stage_key_inputs(cfg, stage, keys)
        key = compute_key(ki)
        keys[stage], uris[stage] = key, store.uri(stage, key)
        problem = store.check(stage, key)  # content-verified: a flipped byte is a miss, not a hit
        cached = problem is None
        if cached:
            reason = "artifact exists and verifies"
        elif problem == MISSING:
            reason = explain_change(store, stage, ki)
        else:
            reason = f"failed verification ({problem}): will recompute"
        out.append(StagePlan(stage, key, uris[stage], cached, reason, ki,
                             {n: uris[n] for n in stage_inputs(cfg, stage)}))
    return out


def method_summary(cfg: PipelineConfig, plans: list[StagePlan]) -> str:
    """One line for `rlhf plan`: the method, its stages, and which of them the store already has (the artifacts
    another method's run made are reused when their keys are the same)."""
    from .config.methods import method_of, uses_reward_stage

    reused = [p.stage for p in plans if p.cached]
    method = method_of(cfg)
    why_reward = ""
    if uses_reward_stage(cfg) and not policy_reads_reward_model(cfg):
        why_reward = "; the reward model only scores evaluation's answers"
    return (f"method {cfg.method}: {' -> '.join(pipeline_stages(cfg))}; {method.policy_stage} trains on "
            f"{method.trains_on}{why_reward}; "
            + (f"reused from the store: {', '.join(reused)}" if reused else "nothing in the store to reuse"))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def _short(v: Any) -> str:
    """Commit SHAs and code hashes shortened for a one-line reason."""
    return v[:12] if isinstance(v, str) and len(v) == 40 else repr(v) if not isinstance(v, str) else v


def explain_change(store: ArtifactStore, stage: str, key_inputs: dict) -> str:
    """Why a stage will run: the difference to the most recent complete artifact of the same stage.
    Most telling first: library versions and hub commits, then settings and inputs, then which code files."""
    latest = None
    for _, _, m in store.ls(stage):
        if m is not None and (latest is None or m.created > latest.created):
            latest = m
    if latest is None:
        return f"no {stage} artifact in the store yet"
    old, new = _flatten(latest.key_inputs), _flatten(key_inputs)
    first: list[str] = []
    diffs: list[str] = []
    code: list[str] = []
    was_in, now_in = list(latest.key_inputs.get("inputs", {})), list(key_inputs.get("inputs", {}))
    if set(was_in) != set(now_in):  # another method's pipeline (e.g. eval of dpo's policy instead of ppo's)
        diffs.append(f"inputs {'+'.join(was_in) or 'none'} -> {'+'.join(now_in) or 'none'}")
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            continue
        was, now = old.get(k, "<unset>"), new.get(k, "<unset>")
        parent = k.rsplit(".", 1)[0]
        if k == "code" or k.startswith("code."):
            code.append(k.removeprefix("code").lstrip(".") or "?")
        elif k.startswith("reward_fn.code."):
            code.append("reward_fn " + k.removeprefix("reward_fn.code."))
        elif k.startswith("libraries."):
            if "libraries" in latest.key_inputs:
                first.append(f"{k.split('.', 1)[1]} {was} -> {now}")
            elif "library versions enter the key now" not in first:
                first.append("library versions enter the key now")
        elif k.endswith(".revision") and (f"{parent}.hub" in new or f"{parent}.name" in new):
            name = new.get(f"{parent}.hub") or new.get(f"{parent}.name")
            first.append(f"hub {name} {_short(was)} -> {_short(now)}")
        elif k.startswith("inputs.") and set(was_in) != set(now_in):
            continue  # said once above
        elif k.startswith("inputs."):
            diffs.append(f"input {k.split('.', 1)[1]} changed")
        elif k.startswith("sources"):
            diffs.append(f"data source {k} changed")
        else:
            diffs.append(f"{k.removeprefix('config.')} {was!r} -> {now!r}")
    if code:
        files = ", ".join(c for c in code[:3] if c != "?") or "stage code"
        diffs.append(f"code changed: {files}" + (f" (+{len(code) - 3} files)" if len(code) > 3 else ""))
    diffs = first + diffs
    if not diffs:
        return "artifact missing"
    more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
    return "; ".join(diffs[:4]) + more


# ---- contract 1: the stage spec a job is launched with ---------------------------------------------------
@dataclass
class StageSpec:
    """What a stage job gets: stage, key, key inputs, the full config, input URIs, output URI, store settings.
    No secrets: credentials come from the job's environment."""

    stage: str
    key: str
    config: dict
    inputs: dict[str, str]
    output_uri: str
    store: dict
    key_inputs: dict = field(default_factory=dict)
    run_dir: str = ""  # local scratch folder for this job (logs, staging of the artifact before upload)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "StageSpec":
        return cls(**json.loads(Path(path).read_text()))

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig.model_validate(self.config)

    def open_store(self) -> ArtifactStore:
        return ArtifactStore(self.store["url"], endpoint_url=self.store.get("endpoint_url"),
                             cache_dir=self.store.get("cache_dir"))


def make_spec(cfg: PipelineConfig, store: ArtifactStore, p: StagePlan, run_dir: str | Path) -> StageSpec:
    return StageSpec(stage=p.stage, key=p.key, config=cfg.model_dump(mode="json", by_alias=True),
                     inputs=p.input_uris, output_uri=p.uri, store=store.settings(), key_inputs=p.key_inputs,
                     run_dir=str(run_dir))


def commit_stage_output(spec: StageSpec, local_dir: str | Path, summary: dict) -> str:
    """Commit a finished stage's folder as its artifact (manifest last). `summary` is a flat dict of scalar
    metrics shown by `rlhf run`; the full history goes in the folder's metrics.json. Call on rank 0 only."""
    store = spec.open_store()
    return store.put_dir(local_dir, spec.stage, spec.key, key_inputs=spec.key_inputs, lineage=spec.inputs,
                         metrics=summary)
