"""One typed config per stage. Stage code reads only its own section (plus `models`)."""
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from . import rules
from ._base import Section
from .training import MAX_BATCH, AdamWConfig, EngineConfig, OptimConfig, TrainingConfig


class SourceConfig(Section):
    """One dataset in the blend."""

    path: str = Field(
        description="Local file/folder (JSON, JSONL, Parquet, CSV; DS-Chat's local/jsonfile layout), a hub name "
        "(e.g. Dahoas/rm-static), or a task shipped with the package: `demo` (tiny models) or `constraints` (real pretrained models)."
    )
    name: str | None = Field(None, description="Short name used in messages and metrics (default: derived from path).")
    weight: float | None = Field(
        None,
        gt=0,
        description="Relative share of this source in the blend. Unset on every source: all rows of every source "
        "are used (DS-Chat's plain concatenation). Set on every non-sft_only source: each source's share of the "
        "blend is weight/sum(weights), taken by subsampling without repetition, sized by the source that runs out "
        "first.",
    )
    schema_: str | None = Field(
        None,
        alias="schema",
        description="Known schema name (rm-static, full-hh-rlhf, synthetic-instruct-gptj-pairwise, "
        "rlhf-reward-datasets, webgpt_comparisons, shp, local/jsonfile, prompt_chosen_rejected, prompt_response, "
        "prompt_chosen); default: inferred from the hub name or the columns.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping for other schemas: keys prompt, chosen, rejected (a pair); or response_a, "
        "response_b plus score_a and score_b (higher wins) or label (index of the preferred response: 0/a or 1/b); "
        "or response (SFT-only). Values are column names; dots reach into nested columns (question.full_text).",
    )
    revision: str | None = Field(None, description="Hub revision (commit/tag) for hub datasets.")
    split: str = Field("train", description="Split to read from the source.")
    eval_split: str | None = Field(
        None,
        description="Split used for evaluation (default: a folder's eval/validation/test files, e.g. local/jsonfile's "
        "eval.json; else `data.eval_fraction` of `split` is carved out).",
    )
    sft_only: bool = Field(False, description="Use this source only for SFT (DS-Chat's sft_only_data_path).")
    gold: str | None = Field(
        None,
        description="Gold scorer for this source's rows (e.g. `demo`, `constraints`; `none` for no gold score); default: the "
        "rows' own `gold` column when they have one.",
    )
    max_rows: int | None = Field(
        None, ge=1, description="Read at most this many rows from each split of the source (quick runs)."
    )

    model_config = Section.model_config | {"populate_by_name": True}

    @field_validator("path")
    @classmethod
    def _absolute_local_path(cls, v: str) -> str:
        """An existing local path becomes absolute, so stage jobs (run in their own folder) read the same file."""
        if v in ("demo", "constraints") or "://" in v:
            return v
        p = Path(v).expanduser()
        return str(p.resolve()) if p.exists() else v


class DataConfig(Section):
    """Blend, split, validate and tokenize the datasets."""

    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(path="demo")], description="Datasets to blend."
    )
    data_split: str = Field("2,4,4", description="Relative sizes of the SFT / reward / PPO phases (DS-Chat).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of each source kept for evaluation.")
    max_prompt_len: int = Field(
        64, ge=1, description="Prompts longer than this many tokens (after formatting) are bad rows."
    )
    max_response_len: int = Field(64, ge=1, description="Responses are truncated to this many tokens (EOS kept).")
    on_bad_row: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop at the first bad row with source:row:field; skip: drop and count them."
    )
    seed: int = Field(1234, description="Seed of the shuffle before the phase split.")

    @field_validator("data_split")
    @classmethod
    def _split_ok(cls, v: str) -> str:
        parts = v.split(",")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"data_split must be three comma-separated numbers, got {v!r}") from None
        if len(nums) != 3 or any(n < 0 for n in nums) or sum(nums) <= 0:
            raise ValueError(f"data_split must be three non-negative numbers with a positive sum, got {v!r}")
        return v


class SFTConfig(TrainingConfig):
    """Step 1: supervised fine-tuning of the actor on the SFT phase."""

    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (DS-Chat does; default masks them).")


class RewardConfig(TrainingConfig):
    """Step 2: pairwise reward model on the reward phase."""

    head_init_std: float | None = Field(
        None, gt=0, description="Std of the value head init (default 1/sqrt(hidden+1))."
    )


class DPOConfig(TrainingConfig):
    """Method dpo: direct preference optimisation of the SFT policy on the reward phase's preference pairs, with
    the SFT policy as the reference (no reward model in training). Step loop, engine, LoRA and checkpoints as SFT's."""

    beta: float = Field(
        0.1, gt=0,
        description="Strength of the pull to the reference: the implicit reward of an answer is beta x (log-prob "
        "under the policy - under the reference); the sigmoid loss scales the pair's log-ratio by it, IPO aims the "
        "log-ratio at 1 / (2 beta). Smaller lets the policy move further from SFT.",
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="sigmoid: DPO's -log sigmoid(beta x log-ratio) (with dpo.label_smoothing: conservative DPO); "
        "ipo: IPO's squared loss (log-ratio - 1 / (2 beta))^2, which stops at a finite margin.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5,
        description="Conservative DPO (loss sigmoid): the share of pairs assumed mislabelled; the loss mixes in "
        "this much of the flipped pair's loss. 0: plain DPO.",
    )
    reference: Literal["auto", "adapter", "copy", "precomputed"] = Field(
        "auto",
        description="How the reference (the SFT policy) is computed. adapter: the policy with its LoRA adapters "
        "disabled (needs dpo.lora.r > 0 and dpo.lora.only_optimize_lora; no second model); copy: a frozen copy of "
        "the SFT policy (ZeRO-3 partitioned when dpo.zero_stage is 3); precomputed: the reference log-probs of "
        "every pair computed once, before training, by the SFT policy (no second model during training); auto: "
        "adapter when LoRA leaves the base frozen, else copy.",
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-6),
        description="Optimizer and schedule (DPO moves a policy far with small steps: default peak lr 1e-6).",
    )

    @property
    def reference_mode(self) -> str:
        """`reference` with auto resolved: adapter, copy or precomputed."""
        if self.reference != "auto":
            return self.reference
        return "adapter" if self.lora.r > 0 and self.lora.only_optimize_lora else "copy"

    @model_validator(mode="after")
    def _reference_and_loss_agree(self):
        rules.reject(rules.dpo_rules(self))
        return self


class PPOModelConfig(EngineConfig):
    """The DeepSpeed side of one PPO model (actor or critic). PPO's loop owns the rest: the learning rates
    (`ppo.actor_lr`, `ppo.critic_lr`), the seed, checkpoints and logging."""

    micro_batch_size: int = Field(
        8, ge=1, le=MAX_BATCH,
        description="Rows per forward/backward inside a PPO mini-batch (capped at ppo.mini_batch_size, which must "
        "be a whole number of them); a mini-batch's micro-batches accumulate into one optimizer step.",
    )
    optim: AdamWConfig = Field(
        default_factory=AdamWConfig, description="Optimizer and schedule (peak lr: ppo.actor_lr / ppo.critic_lr)."
    )


class PPOConfig(Section):
    """Step 3: PPO with the hybrid engine. Every coefficient DS-Chat hard-codes is a field here."""

    actor: PPOModelConfig = Field(default_factory=PPOModelConfig, description="Actor DeepSpeed settings.")
    critic: PPOModelConfig = Field(default_factory=PPOModelConfig, description="Critic DeepSpeed settings.")
    actor_lr: float = Field(1e-5, gt=0, description="Actor peak learning rate.")
    critic_lr: float = Field(5e-6, gt=0, description="Critic peak learning rate.")
    prompt_batch_size: int = Field(
        8, ge=1, le=MAX_BATCH,
        description="Prompts per experience batch (per process); each is answered samples_per_prompt times.",
    )
    samples_per_prompt: int = Field(
        1, ge=1, le=MAX_BATCH,
        description="Answers sampled per prompt: every prompt is repeated this many times in the generation "
        "batch, so an experience batch holds prompt_batch_size x samples_per_prompt rows. grpo/rloo need >= 2 (the "
        "baseline of an answer is the other answers to its prompt); ppo works with any (1: DS-Chat's).",
    )
    generation_batches: int = Field(
        1, ge=1, le=MAX_BATCH, description="Experience batches collected before training on them."
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each experience buffer (reshuffled each pass).")
    mini_batch_size: int = Field(
        8, ge=1, le=MAX_BATCH,
        description="Sequences per PPO update (per process); the experience buffer (prompt_batch_size x "
        "samples_per_prompt x generation_batches) must be a whole number of mini-batches.",
    )
    total_steps: int | None = Field(None, ge=1, description="Stop after this many experience batches (null: epochs).")
    epochs: int = Field(1, ge=1, description="Passes over the PPO prompt set.")
    max_new_tokens: int = Field(32, ge=1, description="Answer length limit during generation.")
    min_new_tokens: int = Field(0, ge=0, description="Force at least this many answer tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use logits / temperature).")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    kl_coef: float = Field(
        0.1, ge=0, description="Initial beta of the per-token KL penalty (k1) in the reward (ppo.kl_in=reward)."
    )
    kl_in: Literal["reward", "loss"] = Field(
        "reward",
        description="Where the KL to the reference (the SFT policy) goes. reward: a per-token k1 penalty "
        "kl_coef x (logp - logp_ref) in the reward, as DS-Chat's PPO (adaptive_kl may steer kl_coef); loss: a "
        "per-token k3 term kl_loss_coef x KL in the policy loss, as GRPO (the reward then has no KL term).",
    )
    kl_loss_coef: float = Field(
        0.04, ge=0, description="Coefficient of the per-token k3 KL term in the policy loss (ppo.kl_in=loss)."
    )
    adaptive_kl: bool = Field(False, description="Ziegler adaptive KL controller instead of a fixed beta.")
    kl_target: float = Field(6.0, gt=0, description="Target KL of the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1, description="Horizon of the adaptive controller.")
    reward: Literal["rm", "fn", "rm+fn"] = Field(
        "rm",
        description="What scores an answer. rm: the reward model (the reward stage's artifact); fn: "
        "ppo.reward_fn alone (no reward model is loaded; with method grpo/rloo the reward stage does not run for "
        "step 3); rm+fn: the reward model's score plus reward_fn_weight x the function's.",
    )
    reward_fn: str | None = Field(
        None,
        description="A programmatic reward `package.module:callable` (ppo.reward fn or rm+fn), called per answer as "
        "callable(prompt, response, **fields) -> float: prompt is the raw prompt, response the decoded answer, "
        "fields the data row's chosen, rejected, gold, source and row, passed to the parameters the callable "
        "names (all of them with **kwargs). Its module's code enters the stage key. Shipped example: "
        "rlhf_tasks.data.demo:gold_score (the demo's gold scorer).",
    )
    reward_fn_weight: float = Field(1.0, description="Multiplies the value of ppo.reward_fn (fn and rm+fn).")
    reward_clip: float = Field(5.0, gt=0, description="Clip the score (RM, function or both) to +-this.")
    whiten_rewards: bool = Field(False, description="Whiten scores per batch (without adding the mean back).")
    missing_eos_penalty: float | None = Field(
        1.0, description="Subtracted from the score of answers that end without EOS; null disables."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip around the old values.")
    vf_coef: float = Field(0.1, ge=0, description="Value-loss coefficient.")
    whiten_advantages: bool | None = Field(
        None,
        description="Masked whitening of advantages per batch; null: on for ppo (GAE advantages), off for "
        "grpo/rloo (their advantages are already baselined per prompt).",
    )
    group_std: bool = Field(
        True,
        description="grpo: divide each prompt's centred scores by their std (false: centring only, as Dr. GRPO, "
        "which does not up-weight prompts whose answers score alike).",
    )
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an EMA of the actor (DS-Chat: 0.992).")
    ptx_coef: float = Field(0.0, ge=0, description="Pretraining LM loss coefficient (DS-Chat's unsup_coef); 0 off.")
    critic_from_reward: bool = Field(True, description="Initialise the critic from the reward model.")
    critic_warmup_steps: int = Field(0, ge=0, description="Experience batches that train only the critic first.")
    offload_reference: bool = Field(False, description="Keep the reference model offloaded to CPU.")
    offload_reward: bool = Field(False, description="Keep the reward model offloaded to CPU.")
    hybrid_engine: Literal["portable", "deepspeed"] = Field(
        "portable", description="portable: ours, any device; deepspeed: DeepSpeed's Hybrid Engine (CUDA only)."
    )
    generation: Literal["auto", "hf", "compiled"] = Field(
        "auto",
        description="How the portable hybrid engine generates experience: compiled = our static-KV-cache decode "
        "loop with its decode step torch.compile'd (CUDA graphs on GPU); hf = transformers' generate; auto = the "
        "decode loop, its step compiled on CUDA and eager on CPU (where compiling takes minutes). Models or "
        "settings the loop does not cover use generate, with the reason logged.",
    )
    inference_tp_size: int = Field(1, ge=1, description="DeepSpeed HE inference tensor parallelism.")
    tp_gather_partition_size: int = Field(8, ge=1, description="DeepSpeed HE gather partition size.")
    release_inference_cache: bool = Field(False, description="DeepSpeed HE: free the inference cache after use.")
    pin_parameters: bool = Field(True, description="DeepSpeed HE: keep gathered parameters pinned.")
    seed: int = Field(1234, description="Seed for init, sampling and shuffling.")
    checkpoint_every: int = Field(0, ge=0, description="Commit a resumable checkpoint every N steps; 0 disables.")
    keep_checkpoints: int = Field(2, ge=1, description="Committed checkpoints kept per stage key (older pruned).")
    log_every: int = Field(1, ge=1, description="Print metrics every N steps (every step is recorded).")

    @field_validator("reward_fn")
    @classmethod
    def _reward_fn_ref(cls, v: str | None) -> str | None:
        return rules.check_callable_ref(v)

    @property
    def uses_reward_model(self) -> bool:
        """Whether answers are scored by the reward model (else by the function alone)."""
        return self.reward in ("rm", "rm+fn")

    @model_validator(mode="after")
    def _batches_align(self):
        rules.reject(rules.ppo_rules(self))
        return self


class EvalConfig(Section):
    """Compare the SFT and PPO policies on held-out prompts."""

    num_prompts: int = Field(64, ge=1, description="Held-out prompts to score.")
    max_new_tokens: int = Field(32, ge=1, description="Answer length limit.")
    do_sample: bool = Field(
        False,
        description="The primary decoding: sampled (true) or greedy (false). Both are always measured; the primary "
        "one has the unprefixed summary keys, the sample table and the report's verdict.",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the sampled answers.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the sampled answers.")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the sampled answers; 0 disables.")
    num_pairs: int = Field(256, ge=1, description="Held-out reward/eval pairs for the RM's pairwise accuracy.")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="Prompts per generation batch.")
    num_samples_in_report: int = Field(8, ge=0, description="Sample prompts shown in the report.")
    seed: int = Field(1234, description="Seed for prompt selection and sampling.")
    reward_fn: str | None = Field(
        None,
        description="Also score every answer with this programmatic reward (`package.module:callable`, called as "
        "ppo.reward_fn is): per policy fn_<policy> (mean, std) and win_rate_fn[_<policy>] vs SFT. Its module's "
        "code enters the eval key.",
    )

    @field_validator("reward_fn")
    @classmethod
    def _reward_fn_ref(cls, v: str | None) -> str | None:
        return rules.check_callable_ref(v)


__all__ = ["SourceConfig", "DataConfig", "SFTConfig", "RewardConfig", "DPOConfig", "PPOModelConfig", "PPOConfig",
           "EvalConfig", "OptimConfig"]
