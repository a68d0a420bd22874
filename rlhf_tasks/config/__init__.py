"""Typed configuration: one pydantic model per stage plus the pipeline. See `PipelineConfig`."""
from .pipeline import (
    ExecutionConfig,
    ModelsConfig,
    PipelineConfig,
    apply_overrides,
    StoreConfig,
    TinyModelConfig,
    config_from_dict,
    load_config,
    parse_override,
    preset_path,
)
from .stages import (DataConfig, DPOConfig, EvalConfig, PPOConfig, PPOModelConfig, RewardConfig, SFTConfig,
                     SourceConfig)
from .training import AdamWConfig, EngineConfig, LoraConfig, OptimConfig, TrainingConfig

__all__ = [
    "PipelineConfig", "ModelsConfig", "StoreConfig", "ExecutionConfig", "TinyModelConfig",
    "DataConfig", "SourceConfig", "SFTConfig", "RewardConfig", "DPOConfig", "PPOConfig", "PPOModelConfig", "EvalConfig",
    "TrainingConfig", "EngineConfig", "OptimConfig", "AdamWConfig", "LoraConfig",
    "load_config", "config_from_dict", "apply_overrides", "parse_override", "preset_path",
]
