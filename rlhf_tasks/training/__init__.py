"""DeepSpeed training: the shared core (`core`), the SFT stage (`sft`) and the reward-model stage (`reward`)."""
