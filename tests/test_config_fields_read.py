"""Every config field is read by the code it configures (the mirror of test_every_field_is_described).

A field nobody reads still enters its stage's key (changing it reruns the stage for nothing) and shows in the UI
form. The check is static, over the source of rlhf_tasks/ (outside config/) and flows/:

- A section field (`ppo.seed`) is read when its name is read (`x.seed`, `x["seed"]`) in the modules that section
  configures (`SECTION_READERS`; the shared building blocks also count where the engine builder lives).
- A field of a block inside a section (`ppo.actor.zero_stage`, `sft.optim.lr`, `models.tiny.num_heads`) must be
  read *through that block*: `<...>.actor.zero_stage`, or `v.zero_stage` where `v` is bound to the block in the
  same function: assigned from `<...>.actor`, a parameter annotated with the block's class, or a parameter that a
  call passes the block to (followed through calls to our own functions); or the whole block is handed on to a
  constructor that takes its fields by name (`f(**<...>.optim.model_dump())`; a plain `model_dump()` for a cache
  key is no read). So `ppo.seed` being read does not make `ppo.actor.seed` read.
"""
from __future__ import annotations

import ast
import typing
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel, create_model

from rlhf_tasks.config import LoraConfig, PipelineConfig, PPOConfig, TrainingConfig

ROOT = Path(__file__).resolve().parent.parent
ANYWHERE = ("rlhf_tasks/", "flows/")
SECTION_READERS = {
    "experiment": ANYWHERE, "method": ANYWHERE, "models": ANYWHERE, "store": ANYWHERE, "execution": ANYWHERE,
    "data": ("rlhf_tasks/data/",),
    "sft": ("rlhf_tasks/training/",),
    "reward": ("rlhf_tasks/training/",),
    "dpo": ("rlhf_tasks/training/",),
    "ppo": ("rlhf_tasks/ppo/",),
    "eval": ("rlhf_tasks/evaluation/",),
}
# the LoRA block of every trained model (sft, reward, ppo.actor, ppo.critic) is read by the training core's apply_lora
BLOCK_READERS = {LoraConfig: ("rlhf_tasks/training/",)}


def _models_in(annotation) -> list[type[BaseModel]]:
    """Config classes inside an annotation (`X`, `X | None`, `list[X]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def field_paths(model: type[BaseModel], prefix: tuple[str, ...] = (), parent: type | None = None):
    """(path, class holding the field) for every leaf and block field under `model`."""
    for name, field in model.model_fields.items():
        yield prefix + (name,), model
        for sub in _models_in(field.annotation):
            yield from field_paths(sub, prefix + (name,), model)


def _chain(node: ast.AST) -> tuple[str, ...]:
    """`a.b.c` -> ("a", "b", "c"); a call/subscript base becomes "" (`f().x` -> ("", "x"))."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "")
    return tuple(reversed(parts))


def _annotation_names(node: ast.AST | None) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()


class Source:
    """What the source reads: attribute chains and string keys per module, and what each name is bound to."""

    def __init__(self, root: Path):
        self.chains: dict[str, set[tuple[str, ...]]] = defaultdict(set)  # module -> every attribute chain read
        self.keys: dict[str, set[str]] = defaultdict(set)  # module -> string subscripts / .get() keys
        self.handed_on: dict[str, set[str]] = defaultdict(set)  # module -> blocks passed on as `**b.model_dump()`
        self.reads: dict[str, set[tuple[str, str]]] = defaultdict(set)  # module -> (scope, name.attr) reads
        self.bound: dict[tuple[str, str], set[str]] = defaultdict(set)  # (scope, name) -> blocks/classes
        self.attr_types: dict[str, set[str]] = defaultdict(set)  # dataclass field name -> annotated classes
        self.params: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)  # func name -> [(scope, params)]
        self.calls: list[tuple[str, str, list[tuple[int | str, ast.AST]]]] = []  # (caller scope, callee, args)
        trees = {p.relative_to(root).as_posix(): ast.parse(p.read_text())
                 for p in sorted(root.glob("rlhf_tasks/**/*.py")) + sorted(root.glob("flows/**/*.py"))}
        trees = {m: t for m, t in trees.items() if not m.startswith("rlhf_tasks/config/")}
        for tree in trees.values():  # dataclass fields first: `r.cfg` is a SourceConfig wherever it is read
            for cls in ast.walk(tree):
                if isinstance(cls, ast.ClassDef):
                    for stmt in cls.body:
                        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                            self.attr_types[stmt.target.id] |= _annotation_names(stmt.annotation)
        for module, tree in trees.items():
            self._scan(module, tree)
        self._follow_calls()

    def _scan(self, module: str, tree: ast.Module) -> None:
        scopes = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    scopes.setdefault(id(node), f"{module}:{fn.name}:{fn.lineno}")
                scope = scopes[id(fn)]
                args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
                self.params[fn.name].append((scope, [a.arg for a in args]))
                for a in args:
                    self.bound[(scope, a.arg)] |= _annotation_names(a.annotation)
        for node in ast.walk(tree):
            scope = scopes.get(id(node), module)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                chain = _chain(node)
                self.chains[module].add(chain)
                if len(chain) >= 2 and chain[0]:
                    self.reads[module].add((scope, f"{chain[0]}.{chain[1]}"))
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                self.keys[module].add(str(node.slice.value))
            elif isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args \
                        and isinstance(node.args[0], ast.Constant):
                    self.keys[module].add(str(node.args[0].value))
                for k in node.keywords:  # f(**block.model_dump()): f takes every field of the block by name
                    if k.arg is None and isinstance(k.value, ast.Call) and _chain(k.value.func)[-1:] == ("model_dump",):
                        self.handed_on[module] |= self._blocks_of(scope, k.value.func.value)
                callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                args = list(enumerate(node.args)) + [(k.arg, k.value) for k in node.keywords if k.arg]
                self.calls.append((scope, callee, args))
            elif isinstance(node, (ast.Assign, ast.For, ast.comprehension)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value = node.value if isinstance(node, ast.Assign) else node.iter
                for target in targets:
                    pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple)
                             and isinstance(value, ast.Tuple) else [(target, value)])
                    for t, v in pairs:
                        if isinstance(t, ast.Name):
                            self.bound[(scope, t.id)] |= self._blocks_of(scope, v)

    def _blocks_of(self, scope: str, value: ast.AST) -> set[str]:
        """What an expression is: `<...>.actor` -> {"actor"}; a bound name -> its bindings; `a or b` -> both."""
        if isinstance(value, ast.BoolOp):
            return set().union(*(self._blocks_of(scope, v) for v in value.values))
        if isinstance(value, ast.Attribute):
            return {value.attr} | self.attr_types.get(value.attr, set())
        if isinstance(value, ast.Name):
            return set(self.bound.get((scope, value.id), set()))
        return set()

    def _follow_calls(self) -> None:
        """Bind a function's parameters to the blocks its callers pass, until nothing changes."""
        changed = True
        while changed:
            changed = False
            for scope, callee, args in self.calls:
                for callee_scope, params in self.params.get(callee, []):
                    skip = 1 if params[:1] in (["self"], ["cls"]) else 0
                    for where, arg in args:
                        name = params[where + skip] if isinstance(where, int) and where + skip < len(params) \
                            else where if where in params else None
                        blocks = self._blocks_of(scope, arg)
                        if name and not blocks <= self.bound[(callee_scope, name)]:
                            self.bound[(callee_scope, name)] |= blocks
                            changed = True

    def is_read(self, path: tuple[str, ...], holder: type, readers: tuple[str, ...]) -> bool:
        field, modules = path[-1], [m for m in self.chains if m.startswith(readers)]
        if len(path) == 2:  # a section's own field: its name read in the modules of that section
            return any(c[-1] == field for m in modules for c in self.chains[m]) or \
                any(field in self.keys[m] for m in modules)
        block, wanted = path[-2], {path[-2], holder.__name__}
        for m in modules:
            if self.handed_on[m] & wanted or any(c[-2:] == (block, field) for c in self.chains[m]):
                return True
            for scope, read in self.reads[m]:
                name, attr = read.split(".")
                if attr == field and self.bound.get((scope, name), set()) & wanted:
                    return True
            if any(c[-1] == field and len(c) >= 3 and self.attr_types.get(c[-2], set()) & wanted
                   for c in self.chains[m]):
                return True
        return False


def unread_fields(config: type[BaseModel], source: Source) -> list[str]:
    out = []
    for path, holder in field_paths(config):
        readers = SECTION_READERS[path[0]] + BLOCK_READERS.get(holder, ())
        if len(path) > 1 and not source.is_read(path, holder, readers):
            out.append(".".join(path))
    return out


SOURCE = Source(ROOT)


def test_every_field_is_read():
    assert unread_fields(PipelineConfig, SOURCE) == []


def test_a_dead_field_is_found():
    """The check can fail: PPO with a supervised stage's TrainingConfig per model (the design before PPOModelConfig)
    has the fields nobody reads for PPO flagged, while the ones PPO reads through the same block are not."""
    old_ppo = create_model("OldPPOConfig", __base__=PPOConfig, actor=(TrainingConfig, TrainingConfig()),
                           critic=(TrainingConfig, TrainingConfig()))
    old = create_model("OldPipelineConfig", __base__=PipelineConfig, ppo=(old_ppo, old_ppo()))
    dead = unread_fields(old, SOURCE)
    for name in ("epochs", "max_steps", "eval_every", "checkpoint_every", "seed", "max_seq_len", "grad_accum"):
        assert f"ppo.actor.{name}" in dead and f"ppo.critic.{name}" in dead, name
    assert "ppo.actor.zero_stage" not in dead and "ppo.actor.lora.r" not in dead
    assert "ppo.seed" not in dead and "sft.epochs" not in dead
