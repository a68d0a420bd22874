"""Full training checkpoints committed to the store; resume from the newest one that verifies, loaded without
unpickling anything but tensors and plain containers."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .private_internals import weights_only_torch_load
from .distributed import all_reduce_sum, barrier, broadcast_object, local_first, rank_world


def _rng_state() -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(st: dict) -> None:
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def unloadable_reason(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be loaded, or None: every torch file is opened with `weights_only=True`
    (memory-mapped: its structure is unpickled, tensor data is not read) and every JSON file parsed. A pickle
    planted as a checkpoint file is refused here and never executed."""
    import zipfile

    folder = Path(folder)
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".pt":
                with weights_only_torch_load():
                    torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
            elif f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt"):
                    pass
        except Exception as e:  # noqa: BLE001 - whatever the reason, this file will not load
            return f"{f.relative_to(folder)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not (folder / "state.json").is_file():
        return "state.json is missing"
    return None


class CheckpointManager:
    """Full training checkpoints of one stage run, committed to the store as `ckpt-<stage>/<key>.step-XXXXXXXX`.

    A checkpoint folder holds, per engine name, DeepSpeed's own checkpoint (module, optimizer, LR scheduler;
    ZeRO shards per rank) plus `state.json` (the caller's state: step, data position, history) and
    `rng/rank-N.json`. Writes go to a local staging folder (on a filesystem all ranks of a node share), rank 0
    commits it (manifest last) and prunes older checkpoints of the key beyond `keep`."""

    def __init__(self, store, stage: str, key: str, staging_dir: str | Path | None = None, keep: int = 2):
        self.store, self.stage, self.key, self.keep = store, stage, key, keep
        self.kind = f"ckpt-{stage}"
        self._touched = False  # whether a load has started changing an engine
        self.staging = Path(staging_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"rlhf-ckpt-{stage}-{key}")

    def tag(self, step: int) -> str:
        return f"{self.key}.step-{step:08d}"

    def steps(self) -> list[int]:
        """Steps with a committed (manifest present) checkpoint of this key, newest first."""
        prefix = f"{self.key}.step-"
        out = []
        for k in self.store.keys(self.kind):
            if k.startswith(prefix) and k[len(prefix):].isdigit() and self.store.read_manifest(self.kind, k):
                out.append(int(k[len(prefix):]))
        return sorted(out, reverse=True)

    def save(self, step: int, engines: dict[str, Any], state: dict) -> str | None:
        """Write and commit a checkpoint (ALL ranks call this). Returns the URI on rank 0."""
        rank, world = rank_world()
        folder = self.staging / f"step-{step:08d}"
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "rng").mkdir(parents=True)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(folder / name), tag="state", client_state={}, save_latest=False)
        (folder / "rng" / f"rank-{rank}.json").write_text(json.dumps(_rng_state()))
        uri = None
        if rank == 0:
            (folder / "state.json").write_text(json.dumps({**state, "step": step, "world_size": world}, indent=1))
        barrier()
        if rank == 0:
            if self.store.read_manifest(self.kind, self.tag(step)) is not None:  # stale (e.g. failed to verify)
                self.store.delete(self.kind, self.tag(step))
            uri = self.store.put_dir(folder, self.kind, self.tag(step), metrics={"step": step})
            shutil.rmtree(folder, ignore_errors=True)
            for old in self.steps()[self.keep:]:
                self.store.delete(self.kind, self.tag(old))
            print(f"[{self.stage}] checkpoint committed: step {step} -> {uri}", flush=True)
        barrier()
        return uri

    def _latest_local(self, skip: set[int] = frozenset()) -> tuple[int, Path] | None:
        """Rank 0: the newest checkpoint (not in `skip`) that verifies and whose files all open safely."""
        from ..errors import StoreError

        for step in self.steps():
            if step in skip:
                continue
            try:  # a remote get() re-hashes every file while downloading; a local folder is hashed here
                if self.store.is_local:
                    self.store.verify(self.kind, self.tag(step), deep=True)
                folder = self.store.get(self.kind, self.tag(step))
            except (StoreError, OSError) as e:
                print(f"[{self.stage}] skipping checkpoint step {step}: {e}", flush=True)
                continue
            problem = unloadable_reason(folder)
            if problem is None:
                return step, folder
            print(f"[{self.stage}] WARNING: skipping checkpoint step {step}: it verifies but cannot be loaded "
                  f"({problem})", flush=True)
        return None

    def latest(self, skip: set[int] = frozenset()) -> tuple[int, Path] | None:
        """(step, local folder) of the newest complete checkpoint that verifies and opens safely, or None. In a
        process group, rank 0 chooses (and downloads); the others fetch the same step."""
        rank, world = rank_world()
        found = self._latest_local(skip) if rank == 0 else None
        if world == 1:
            return found
        step = broadcast_object(found[0] if found else None)
        if step is None:
            return None
        # rank 0 holds it already; the first rank of every other node downloads it, then its neighbours reuse it
        return step, Path(local_first(lambda: self.store.get(self.kind, self.tag(step))))

    def restore(self, engines: dict[str, Any]) -> tuple[int, dict] | None:
        """Load the newest checkpoint that verifies AND loads into `engines` (module, optimizer, scheduler, RNG);
        return (step, state), or None when there is none (start fresh). A checkpoint that verifies but cannot be
        loaded is skipped for the previous one with a warning, so it never fails every retry. Its files are
        opened (weights_only, structure only) before any engine is touched; should DeepSpeed still fail half-way,
        only a complete load of an older checkpoint may follow (else this raises: the engines are not fresh)."""
        rank, world = rank_world()
        skip: set[int] = set()
        while True:
            found = self.latest(skip)
            if found is None:
                if skip and self._touched:
                    raise RuntimeError(f"[{self.stage}] checkpoint step(s) {sorted(skip)} failed while loading and "
                                       f"no older one loads; delete {self.kind}/{self.key}.step-* to start fresh")
                return None
            step, folder = found
            error = None
            try:
                state = self.load(folder, engines)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to load makes this checkpoint unusable
                error = e
            failed = error is not None
            if world > 1:  # every rank must agree, or the collectives of the next attempt would not match
                failed = all_reduce_sum([float(failed)])[0] > 0
            if not failed:
                return step, state
            if rank == 0 or error is not None:
                print(f"[{self.stage}] WARNING: skipping checkpoint step {step}: it cannot be loaded "
                      f"({type(error).__name__ if error else 'failed on another rank'}: {error})", flush=True)
            skip.add(step)

    def load(self, local_dir: str | Path, engines: dict[str, Any]) -> dict:
        """Restore every engine (module, optimizer, scheduler) and this rank's RNG states; return the state dict.
        Torch files are read with `weights_only=True` (nothing else is unpickled)."""
        local_dir = Path(local_dir)
        rank, world = rank_world()
        state = json.loads((local_dir / "state.json").read_text())
        if state.get("world_size") != world:
            raise ConfigError(f"checkpoint {local_dir.name} was written by {state.get('world_size')} processes, "
                              f"this run has {world}")
        for name, engine in engines.items():
            self._touched = True
            with weights_only_torch_load():
                path, _ = engine.load_checkpoint(str(local_dir / name), tag="state", load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint {local_dir / name}")
        _set_rng_state(json.loads((local_dir / "rng" / f"rank-{rank}.json").read_text()))
        return state
