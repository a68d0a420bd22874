"""Everything that can be checked before a launch, in one place: `rlhf run`, `rlhf plan` and the flow (when it
plans itself) call `check_inputs` before any store write, Prefect start or job launch. A problem raises a
UserError whose message is one line naming the key, file or row (the CLI exits 2)."""
from __future__ import annotations

from .config import PipelineConfig


def check_inputs(cfg: PipelineConfig) -> None:
    """Check the config's data sources (paths, schemas, every row, empty phases)."""
    from .data.stage import validate_sources

    validate_sources(cfg)
