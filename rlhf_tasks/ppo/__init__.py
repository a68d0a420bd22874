"""Step 3: PPO with a hybrid engine.

Public API (DeepSpeed-Chat style, for custom RLHF loops):
    engine = RLHFEngine(actor=..., reward=..., critic=None, ref=None, tokenizer=..., config=PPOConfig(...))
    trainer = PPOTrainer(engine, config)
    exp = trainer.generate_experience(prompt_batch); stats = trainer.train_rlhf(exp)   # or trainer.step(batch)
Critic-free (GRPO, RLOO): RLHFEngine(..., with_critic=False) and CriticFreeTrainer(engine, config, estimator=...).
Pieces: `ppo_math` (pure PPO math), `hybrid` (generation mode for a training engine), `engine`, `trainer`,
`stage` (the pipeline's PPO job).
"""
from .engine import RLHFEngine
from .hybrid import DeepSpeedHybridEngine, HybridEngine, PortableHybridEngine, make_hybrid_engine
from .trainer import CriticFreeTrainer, Experience, PPOTrainer

__all__ = ["RLHFEngine", "PPOTrainer", "CriticFreeTrainer", "Experience", "HybridEngine", "PortableHybridEngine",
           "DeepSpeedHybridEngine", "make_hybrid_engine"]
