"""Gold scorers: programmatic rewards named by a data row's `gold` column (e.g. "demo"), used by evaluation.

Only registered names resolve (a dataset cannot make us import code). Register more with `register_gold_scorer`.
"""
from __future__ import annotations

from typing import Callable

from ..errors import ConfigError

GoldScorer = Callable[[str, str], float]  # (raw prompt, response text) -> score

_SCORERS: dict[str, Callable[[], GoldScorer]] = {}


def register_gold_scorer(name: str, factory: Callable[[], GoldScorer]) -> None:
    """Register a scorer under `name`; `factory` is called lazily on first use."""
    _SCORERS[name] = factory


def known_gold_scorers() -> list[str]:
    return sorted(_SCORERS)


def get_gold_scorer(name: str) -> GoldScorer:
    """The scorer called `name`: `scorer(prompt, response) -> float`. Unknown names raise ConfigError."""
    if name not in _SCORERS:
        raise ConfigError(f"unknown gold scorer {name!r} (known: {', '.join(known_gold_scorers())})")
    return _SCORERS[name]()


def _demo() -> GoldScorer:
    from .demo import gold_score

    return gold_score


def _constraints() -> GoldScorer:
    from .constraints import gold_score

    return gold_score


register_gold_scorer("demo", _demo)
register_gold_scorer("constraints", _constraints)
