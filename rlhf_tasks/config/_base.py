"""Shared base for every config model: unknown keys are errors, every field documents itself."""
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section. `extra="forbid"` turns a typo into an error naming the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
