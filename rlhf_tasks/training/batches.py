"""Deterministic sharded batches (the data-loader position is just the step), padding and truncation."""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..models import pad_token_lists


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batch_indices(perm: list[int], step_in_epoch: int, micro: int, mb: int, grad_accum: int, world: int,
                        rank: int) -> list[int]:
    """Rows of micro-batch `micro` of optimizer step `step_in_epoch` for `rank`: a global batch is
    mb * grad_accum * world consecutive rows of the epoch's permutation (drop-last)."""
    start = ((step_in_epoch * grad_accum + micro) * world + rank) * mb
    return perm[start:start + mb]


def eval_shards(n: int, mb: int, rank: int, world: int) -> Iterator[tuple[list[int], list[bool]]]:
    """Eval batches of this rank: rows rank::world in batches of `mb`. Every rank yields the same number of
    batches (ZeRO-3 forwards are collective); missing rows are padded with row 0 and flagged False."""
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world) if n else 0
    for start in range(0, per_rank, mb):
        idx = mine[start:start + mb]
        size = min(mb, per_rank - start)
        valid = [True] * len(idx) + [False] * (size - len(idx))
        yield idx + [0] * (size - len(idx)), valid


def pad_batch(seqs: list[list[int]], pad_id: int, labels: list[list[int]] | None = None,
              dev: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token lists -> input_ids, attention_mask (and labels padded with -100)."""
    ids, mask = pad_token_lists(seqs, pad_id, "right", min_width=1)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = pad_token_lists(labels, -100, "right", min_width=ids.shape[1])[0]
    if dev is not None:
        out = {k: v.to(dev) for k, v in out.items()}
    return out



def join_truncate(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], int]:
    """prompt + response within `max_len` tokens, keeping the response whole when it fits (the prompt loses its
    beginning) -> (ids, number of prompt tokens kept)."""
    response = list(response)[:max_len]
    keep = max_len - len(response)
    prompt = list(prompt)[-keep:] if keep > 0 else []
    return prompt + response, len(prompt)
