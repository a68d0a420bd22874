"""Stand-in stage jobs for the flow tests ONLY (tests/test_flows.py registers them in STAGE_DEFS, in the test
process and, through a generated sitecustomize, in the job subprocesses). Each writes a small artifact in a
fraction of a second, prints progress lines like the training core, and can be told to crash or fail:

- FAKE_EVENTS=<file>: append `<stage> <start step> <flow run id>` per launch (which stages ran, where they
  resumed, in which Prefect flow run);
- FAKE_CRASH_STAGE=<stage>: commit a checkpoint at step 2, then SIGKILL itself (once: a resumed run finishes);
- FAKE_FAIL_STAGE=<stage>: exit with code 3;
- FAKE_BAD_INPUT_STAGE=<stage>: raise a DataError (bad input found inside the job: stage_main exits 2);
- FAKE_FAIL_CONFIG=<stage>:<dotted key>=<value>: exit with code 3 when the job's config has that value (one
  variant of a sweep fails);
- FAKE_RENDEZVOUS=<folder>:<stage>,<stage>: those stages each announce themselves in the folder and wait (up to
  FAKE_RENDEZVOUS_S, default 120 s) until all of them have: they finish only if they ran at the same time, and
  exit with code 4 otherwise.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from rlhf_tasks.errors import DataError
from rlhf_tasks.stages import StageSpec, commit_stage_output

TOTAL_STEPS = 4


def _latest_checkpoint(store, stage: str, key: str) -> int:
    kind = f"ckpt-{stage}"
    steps = [int(k.split(".step-")[1]) for k in store.keys(kind)
             if k.startswith(f"{key}.step-") and store.exists(kind, k)]
    return max(steps, default=0)


def run(spec: StageSpec) -> None:
    store = spec.open_store()
    out = Path(spec.run_dir) / "out"
    out.mkdir(parents=True, exist_ok=True)
    start = _latest_checkpoint(store, spec.stage, spec.key)
    if os.environ.get("FAKE_EVENTS"):
        with open(os.environ["FAKE_EVENTS"], "a") as f:
            f.write(f"{spec.stage} {start} {os.environ.get('PREFECT__FLOW_RUN_ID', '-')}\n")
    if os.environ.get("FAKE_FAIL_STAGE") == spec.stage:
        print("fake failure: something broke", flush=True)
        sys.exit(3)
    if os.environ.get("FAKE_BAD_INPUT_STAGE") == spec.stage:
        raise DataError(f"fake.jsonl:3:prompt: bad row found inside the {spec.stage} job")
    if _config_says_fail(spec):
        print("fake failure of this variant", flush=True)
        sys.exit(3)
    _rendezvous(spec.stage)
    for step in range(start + 1, TOTAL_STEPS + 1):
        print(f"step {step}/{TOTAL_STEPS} loss={1.0 / step:.3f} kl=0.01", flush=True)
        if step == 2 and os.environ.get("FAKE_CRASH_STAGE") == spec.stage and start == 0:
            ck = out / "ckpt"
            ck.mkdir(exist_ok=True)
            (ck / "state.json").write_text(json.dumps({"step": step}))
            store.put_dir(ck, f"ckpt-{spec.stage}", f"{spec.key}.step-{step:08d}")
            print("checkpoint committed at step 2; crashing", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    # Inputs are read the way real stages read them (store.get_uri: checked by content), and what was read is
    # recorded, so a test can tell which bytes a downstream stage consumed.
    consumed = {name: (store.get_uri(uri) / "result.json").read_text() for name, uri in sorted(spec.inputs.items())}
    (out / "result.json").write_text(json.dumps({"stage": spec.stage, "inputs": spec.inputs, "consumed": consumed},
                                                sort_keys=True))
    if spec.stage == "eval":
        (out / "samples.json").write_text(json.dumps([{"prompt": "Hi?", "sft": "hello", "ppo": "hello there"}]))
    commit_stage_output(spec, out, {"fake_loss": 0.25, "resumed_from_step": start})


def _config_says_fail(spec: StageSpec) -> bool:
    stage, _, assignment = os.environ.get("FAKE_FAIL_CONFIG", "").partition(":")
    if stage != spec.stage or "=" not in assignment:
        return False
    key, value = assignment.split("=", 1)
    node = spec.config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return str(node) == value


def _rendezvous(stage: str) -> None:
    folder, _, names = os.environ.get("FAKE_RENDEZVOUS", "").rpartition(":")
    peers = names.split(",")
    if not folder or stage not in peers:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / stage).touch()
    deadline = time.monotonic() + float(os.environ.get("FAKE_RENDEZVOUS_S", "120"))
    while not all((Path(folder) / p).exists() for p in peers):
        if time.monotonic() > deadline:
            print(f"rendezvous: {stage} waited alone for {peers}", flush=True)
            sys.exit(4)
        time.sleep(0.05)
    print(f"rendezvous: {stage} met {peers}", flush=True)


def install() -> None:
    """Point every stage at this module (in place: stage_main holds a reference to the same dict) and make the
    data fingerprint a pure function of the source paths. `distributed` stays: it says which stages are the
    training jobs a work pool runs (flows/runner.TRAINING_STAGES), and one process needs no launcher anyway."""
    import dataclasses

    from rlhf_tasks import stages

    for name, d in list(stages.STAGE_DEFS.items()):
        stages.STAGE_DEFS[name] = dataclasses.replace(d, module=__name__)
    stages.data_source_fingerprints = lambda cfg: [{"path": s.path} for s in cfg.data.sources]
