"""The alignment methods and the stages each one runs: the one table `method` is looked up in.

A method names the stage that trains the policy evaluation compares with SFT (`policy_stage`) and whether that
stage reads the reward model (`trains_on_reward_model`). The pipeline of a config is then
    data -> sft -> [reward] -> <policy stage> -> eval
where the reward stage runs when the policy stage trains on it or evaluation scores with it.
A new method is one row here (plus its stage in `rlhf_tasks.stages.STAGE_DEFS`); the `method` field's choices, the
plan, `--until`, preflight's fit checks and the evaluation inputs all follow from this table.

Pure names, no I/O: the config rules read it too (config imports nothing else of ours).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import PipelineConfig


@dataclass(frozen=True)
class Method:
    policy_stage: str  # the stage that trains the method's policy (its artifact: an HF folder or `actor/`)
    trains_on_reward_model: bool  # the policy stage takes the reward stage's artifact as an input
    trains_on: str  # what the policy stage learns from, for `rlhf plan`


METHODS: dict[str, Method] = {
    "ppo": Method("ppo", trains_on_reward_model=True, trains_on="its own answers scored by the reward model"),
    # critic-free step 3 (rlhf_tasks.ppo.stage); scored by `ppo.reward_fn` alone they do not read the reward model
    "grpo": Method("grpo", trains_on_reward_model=True, trains_on="groups of its own answers, scored (ppo.reward)"),
    "rloo": Method("rloo", trains_on_reward_model=True, trains_on="groups of its own answers, scored (ppo.reward)"),
    # direct preference optimisation (rlhf_tasks.training.dpo): the reward stage runs only for evaluation's scores
    "dpo": Method("dpo", trains_on_reward_model=False,
                  trains_on="the reward phase's preference pairs directly (the SFT policy is its reference)"),
}
STEP3 = ("ppo", "grpo", "rloo")  # the methods whose policy stage is step 3 (the `ppo` section configures it)
POLICY_STAGES = tuple(dict.fromkeys(m.policy_stage for m in METHODS.values()))


def method_of(cfg: PipelineConfig) -> Method:
    return METHODS[cfg.method]


def policy_reads_reward_model(cfg: PipelineConfig) -> bool:
    """Whether the method's stage reads the reward model: for step 3 as its config says (`ppo.reward`, and PPO's
    critic initialisation: rules.needs_reward_model), else as the table says."""
    if cfg.method in STEP3:
        from .rules import needs_reward_model

        return needs_reward_model(cfg.method, cfg.ppo)
    return method_of(cfg).trains_on_reward_model


def uses_reward_stage(cfg: PipelineConfig) -> bool:
    """The reward model is trained when the method trains on it or evaluation scores answers with it."""
    return policy_reads_reward_model(cfg) or "reward" in eval_inputs(cfg)


def pipeline_stages(cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages a run of `cfg` has, in order: data, sft, reward (when used), the method's stage, eval."""
    reward = ("reward",) if uses_reward_stage(cfg) else ()
    return ("data", "sft", *reward, method_of(cfg).policy_stage, "eval")


def eval_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    """What the eval stage reads: the data (held-out prompts, pairs), the SFT policy (the baseline and the KL
    reference), the reward model when it scores, and the policy the method trained."""
    return ("data", "sft", "reward", method_of(cfg).policy_stage)
