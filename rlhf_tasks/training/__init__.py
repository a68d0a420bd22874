"""DeepSpeed training: the core shared by SFT, the reward model and PPO (one module per concern), and the SFT
(`sft`) and reward-model (`reward`) stages.

  distributed           process group alone or under a launcher, rank/world, device, collectives, seeding
  engine                the generated DeepSpeed config, `build_engine`, LoRA, gradient checkpointing
  private_internals     every read or patch of a library's private internals (DeepSpeed, torch, transformers)
  op_builds             DeepSpeed's JIT-compiled ops: a `[build]` line before a compile, `prebuild` ahead of time
  export                `save_hf`: a consolidated plain HF folder (ZeRO-3 gathered, LoRA merged, safetensors)
  checkpoint            `CheckpointManager`: full training checkpoints in the store, resume from the newest good one
  resumable             `ResumableRun`: the resume scaffolding of every stage job (SFT, RM, PPO) and its commit
  metrics               `MetricsLogger`: progress lines, history, TensorBoard, metrics.json
  batches               deterministic sharded batches, padding, truncation
  loop                  `run_training_stage` / `fit_task`: the SFT/RM step loop (as a stage job / from Python)
  examples              stage job setup (SFT, RM, PPO) and token ids of one data phase/split
  sft, reward           the two supervised stages: their loss and eval, `fit` and the job entry `run(spec)`

From Python without a pipeline: `sft.fit(model, tokenizer, train_ids, eval_ids, SFTConfig(...))`, `reward.fit(...)`.
"""
