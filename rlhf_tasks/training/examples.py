"""Stage job setup (SFT, the reward model and PPO) and example loading (SFT, the reward model): the config, process
group, store and data artifact of a job, model references as local paths, token ids of one phase/split."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .distributed import configure_threads, init_distributed, local_first


@dataclass
class StageContext:
    """What a stage job starts with: its config, rank/world, the store and the local data artifact folder."""

    cfg: Any
    rank: int
    world: int
    store: Any
    data_dir: Path
    hub_pins: dict[str, str] = field(default_factory=dict)  # hub model -> the commit its stage key names


def stage_setup(spec) -> StageContext:
    """Threads, process group, config, store and the (downloaded, verified) data input of a stage job."""
    from ..stages import hub_pins

    configure_threads()
    rank, world = init_distributed()
    cfg = spec.pipeline_config()
    store = spec.open_store()
    data_dir = local_first(lambda: store.get_uri(spec.inputs["data"]))
    return StageContext(cfg, rank, world, store, Path(data_dir), hub_pins(spec.key_inputs))


def resolve_model_path(ref: str, ctx: StageContext) -> str:
    """A model reference (tiny:*, store URI, folder, hub name) as a local path, built/downloaded once per node."""
    from ..models import resolve_model

    revision = ctx.hub_pins.get(ref, ctx.cfg.models.revision)
    return local_first(lambda: resolve_model(ref, ctx.cfg.models.tiny, ctx.store, revision))


def load_examples(ctx: StageContext, phase: str, split: str, tokenizer, columns=("chosen",)) -> dict[str, list]:
    """Token ids of one phase/split: {"prompt_ids": [...], "<col>_ids": [...]} (rows whose columns are null are
    dropped). When `tokenizer` does not reproduce the artifact's ids (a reward model with another vocabulary), the
    texts are re-tokenized with it in the same format."""
    from ..data.artifact import load_phase

    ds = load_phase(ctx.data_dir, phase, split)
    cols = ds.select_columns(["prompt", "prompt_text", "prompt_ids"]
                             + [c for c in columns] + [f"{c}_ids" for c in columns]).to_dict()
    keep = [i for i in range(len(cols["prompt"])) if all(cols[f"{c}_ids"][i] is not None for c in columns)]
    cols = {k: [v[i] for i in keep] for k, v in cols.items()}
    if cols["prompt"] and not _ids_match(tokenizer, cols, columns):
        from ..data.formatting import format_prompt, tokenize_prompts, tokenize_responses

        if ctx.rank == 0:
            print(f"[{phase}] the model's tokenizer differs from the data's: re-tokenizing {split} texts", flush=True)
        texts = [format_prompt(tokenizer, p) for p in cols["prompt"]]
        cols["prompt_ids"] = tokenize_prompts(tokenizer, texts)
        for c in columns:
            cols[f"{c}_ids"] = tokenize_responses(tokenizer, cols[c], ctx.cfg.data.max_response_len)
    return {k: cols[k] for k in ["prompt_ids"] + [f"{c}_ids" for c in columns]}


def _ids_match(tokenizer, cols: dict, columns, n: int = 8) -> bool:
    from ..data.formatting import tokenize_prompts, tokenize_responses

    k = min(n, len(cols["prompt"]))
    if list(tokenize_prompts(tokenizer, cols["prompt_text"][:k])) != [list(x) for x in cols["prompt_ids"][:k]]:
        return False
    for c in columns:
        longest = max(len(x) for x in cols[f"{c}_ids"][:k])
        got = tokenize_responses(tokenizer, cols[c][:k], longest)
        if [list(x) for x in got] != [list(x) for x in cols[f"{c}_ids"][:k]]:
            return False
    return True
