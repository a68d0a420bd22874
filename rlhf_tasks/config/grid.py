"""The grid of a sweep: the typed `grid` parameter of the `rlhf-sweep` flow (a form in the UI) and what
`rlhf sweep --grid KEY=V1,V2` parses into (rlhf_tasks/sweep.py)."""
from __future__ import annotations

from typing import Union

from pydantic import Field

from ._base import Section


class GridAxis(Section):
    """One axis of a sweep: a dotted config key and its values. The sweep runs one variant per combination of the
    axes' values; stages whose key no axis changes run once for all of them."""

    key: str = Field(description="Dotted config key, e.g. ppo.kl_coef (any key but store.*: a sweep has one store).")
    values: list[Union[bool, int, float, str]] = Field(
        description="The values the key takes, e.g. [0.05, 0.1, 0.2] (at least one, none twice).")
