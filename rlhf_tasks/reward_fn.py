"""Programmatic rewards: `package.module:callable` references (`ppo.reward_fn`, `eval.reward_fn`).

    fn = load_reward_fn("rlhf_tasks.data.demo:gold_score", "ppo.reward_fn")
    fn("Describe the cat.", "the cat is warm and calm", {"chosen": ..., "gold": "demo"})   # -> float

The callable gets the raw prompt, the decoded answer and, by keyword, the data row's fields (`ROW_FIELDS`) that
its signature names (every one of them when it takes **kwargs), so `gold_score(prompt, response)` and
`score(prompt, response, chosen)` (a verifiable reward against the reference answer) both work unchanged.

Identity: `code_identity` is what a stage key records of a reference: the reference and a hash of the code of its
module and of every module of the module's own top-level package that it imports (provenance.import_closure, read
from the files without importing them), so editing the function re-runs the stages that score with it and nothing
else. Bad references are bad input: one line naming the config field (preflight checks them before any job).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from .errors import ConfigError
from .provenance import module_code_hashes

ROW_FIELDS = ("chosen", "rejected", "gold", "source", "row")  # data-artifact columns a reward function may take


def split_ref(ref: str) -> tuple[str, str]:
    """`pkg.mod:attr.sub` -> ("pkg.mod", "attr.sub"); the config validators have checked the form."""
    module, _, attr = ref.partition(":")
    return module, attr


def code_identity(ref: str, where: str) -> dict[str, Any]:
    """What a stage key records of a reward function: {"ref": ref, "code": {file: hash}} (see the module doc)."""
    module, _ = split_ref(ref)
    code = module_code_hashes(module)
    if code is None:
        raise ConfigError(f"{where}: {ref}: no module named {module!r} (is its package installed or on "
                          "PYTHONPATH?)")
    return {"ref": ref, "code": code}


class RewardFn:
    """A loaded reward function: `fn(prompt, response, fields) -> float`, passing the row fields it takes (the
    parameters after its first two, or all of them when it takes **kwargs)."""

    def __init__(self, fn: Callable[..., Any], name: str = ""):
        self.fn, self.name = fn, name or getattr(fn, "__qualname__", repr(fn))
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: prompt and response only
            params = []
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)]
        self.takes = {p.name for p in named[2:]}

    def __call__(self, prompt: str, response: str, fields: dict[str, Any] | None = None) -> float:
        extra = {k: v for k, v in (fields or {}).items() if self.takes_all or k in self.takes}
        value = self.fn(prompt, response, **extra)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"reward function {self.name} returned {value!r} for the prompt {prompt[:60]!r}; "
                              "it must return a number") from None


def load_reward_fn(ref: str | Callable[..., Any], where: str = "reward_fn") -> RewardFn:
    """Import `package.module:callable` (or wrap a callable given as is). Any failure is a ConfigError naming
    `where` (one line: the CLI prints it and exits 2)."""
    if callable(ref):
        return RewardFn(ref)
    module_name, attr = split_ref(ref)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}: {ref}: no module named {e.name!r}") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say how, in one line
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{where}: {ref}: importing {module_name} failed ({type(e).__name__}: {detail})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {ref}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {ref}: {attr!r} is not callable")
    return RewardFn(obj, ref)


def row_fields(cols: dict[str, list], i: int) -> dict[str, Any]:
    """The ROW_FIELDS of row `i` of a column dict (those present)."""
    return {k: cols[k][i] for k in ROW_FIELDS if k in cols}
