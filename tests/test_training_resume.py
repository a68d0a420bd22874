"""Crash and resume: a stage job SIGKILLed after step k resumes from its last committed checkpoint and reproduces
the per-step losses and the step count of an uninterrupted run. Multi-process runs (world size 2, ZeRO-2/3) are
marked slow; one single-process kill/resume runs in the default suite."""
import uuid

import pytest

from _training_helpers import (launch_and_kill, make_spec, metrics, put_tiny_sft, run_in_process, step_losses,
                               tiny_cfg)
from rlhf_tasks.config import ExecutionConfig
from rlhf_tasks.launch import run_stage


def _cfg(stage, steps, extra=()):
    return tiny_cfg([f"{stage}.micro_batch_size=4", f"{stage}.max_seq_len=64", f"{stage}.optim.lr=2e-3",
                     f"{stage}.optim.warmup_ratio=0.2", f"{stage}.max_steps={steps}", f"{stage}.checkpoint_every=2",
                     f"{stage}.dropout=0.1", f"{stage}.log_every=1", *extra])


def _inputs(stage, store, cfg) -> dict:
    """The inputs a stage job reads besides the data: dpo starts from an SFT artifact (the tiny actor as is)."""
    return {"sft": put_tiny_sft(store, cfg)} if stage == "dpo" else {}


def _run(stage, cfg, store, data_uri, tmp_path, execution, name):
    key = uuid.uuid4().hex[:24]
    spec = make_spec(stage, cfg, store, data_uri, tmp_path / name, key, _inputs(stage, store, cfg))
    uri = run_stage(spec, execution, log=lambda line: None)
    return spec, metrics(store, uri)


def kill_resume_equality(stage, store, data_uri, tmp_path, execution, steps=6, kill_after=3, extra=(),
                         full_run=None):
    """`full_run(cfg) -> metrics` runs the uninterrupted reference (default: launched like the crash run)."""
    cfg = _cfg(stage, steps, extra)
    if full_run is None:
        _, full = _run(stage, cfg, store, data_uri, tmp_path, execution, "full")
    else:
        full = full_run(cfg)

    key = uuid.uuid4().hex[:24]
    spec = make_spec(stage, cfg, store, data_uri, tmp_path / "crash", key, _inputs(stage, store, cfg))
    launch_and_kill(spec, execution, kill_after_step=kill_after)
    assert not store.exists(stage, key)
    assert [k for k in store.keys(f"ckpt-{stage}") if k.startswith(key)] == [f"{key}.step-00000002"]
    run_stage(spec, execution, log=lambda line: None)  # same spec: resumes from step 2
    resumed = metrics(store, spec.output_uri)
    assert [k for k in store.keys(f"ckpt-{stage}") if k.startswith(key)] == []  # deleted after the commit

    assert resumed["summary"]["resumed_from_step"] == 2
    assert resumed["summary"]["steps"] == full["summary"]["steps"] == steps
    a, b = step_losses(full), step_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), f"step {s}: {a[s]} vs {b[s]}"
    for k, v in full["summary"].items():
        if k.startswith("eval_"):
            assert resumed["summary"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    return full, resumed


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_kill_and_resume_single_process(stage, store, data_uri, tmp_path, monkeypatch):
    def in_process(cfg):  # the reference run without a launch (saves a job start)
        key = uuid.uuid4().hex[:24]
        spec = make_spec(stage, cfg, store, data_uri, tmp_path / "full", key, _inputs(stage, store, cfg))
        run_in_process(spec, monkeypatch)
        return metrics(store, spec.output_uri)

    full, resumed = kill_resume_equality(stage, store, data_uri, tmp_path,
                                         ExecutionConfig(device="cpu", timeout_s=300), full_run=in_process)
    if stage == "dpo":  # every per-step DPO metric, not only the loss, is the uninterrupted run's
        a = {r["step"]: r for r in full["history"] if "loss" in r}
        b = {r["step"]: r for r in resumed["history"] if "loss" in r}
        for s in a:
            for k in ("accuracy", "margin", "logp_chosen", "logp_rejected"):
                assert b[s][k] == pytest.approx(a[s][k], rel=1e-5, abs=1e-6), f"step {s} {k}"


@pytest.mark.slow
@pytest.mark.parametrize("stage,extra", [("sft", []), ("dpo", ["dpo.reference=copy"])])
def test_kill_and_resume_two_processes_zero3(stage, extra, store, data_uri, tmp_path):
    """ZeRO-3 over two ranks (dpo: its frozen reference copy partitioned as well)."""
    kill_resume_equality(stage, store, data_uri, tmp_path, ExecutionConfig(device="cpu", num_procs=2, timeout_s=600),
                         extra=[f"{stage}.zero_stage=3", *extra])


@pytest.mark.slow
def test_reward_kill_and_resume_two_processes_zero3(store, data_uri, tmp_path):
    kill_resume_equality("reward", store, data_uri, tmp_path,
                         ExecutionConfig(device="cpu", num_procs=2, timeout_s=600), extra=["reward.zero_stage=3"])


@pytest.mark.slow
@pytest.mark.parametrize("stage,zero,lora", [("sft", 2, 0), ("reward", 2, 4), ("sft", 3, 4), ("reward", 3, 0)])
def test_two_processes_train(stage, zero, lora, store, data_uri, tmp_path):
    """World size 2 under torchrun: the loss goes down and the output is a plain HF folder."""
    cfg = tiny_cfg([f"{stage}.micro_batch_size=8", f"{stage}.max_seq_len=64", f"{stage}.optim.lr=3e-3",
                    f"{stage}.max_steps=10", f"{stage}.epochs=3", f"{stage}.zero_stage={zero}", f"{stage}.lora.r={lora}",
                    f"{stage}.gradient_checkpointing={str(bool(lora)).lower()}"])
    _, m = _run(stage, cfg, store, data_uri, tmp_path, ExecutionConfig(device="cpu", num_procs=2, timeout_s=600),
                f"ws2-{stage}-{zero}-{lora}")
    s = m["summary"]
    assert s["world_size"] == 2 and s["steps"] == 10
    assert s["eval_loss"] < s["eval_loss_before"]
    if stage == "reward":
        assert s["eval_accuracy"] > 0.6


def test_bad_input_in_job_is_a_one_line_input_error(store, data_uri, tmp_path):
    """Too few rows for one optimizer step (only the job knows the phase's row count): the job exits 2 and the
    launcher raises JobInputError (never retried) carrying the job's one line, without a traceback."""
    from rlhf_tasks.errors import JobInputError

    cfg = tiny_cfg(["reward.micro_batch_size=4096"])  # within the load-time bound; more rows than the phase has
    spec = make_spec("reward", cfg, store, data_uri, tmp_path / "bad", uuid.uuid4().hex[:24])
    with pytest.raises(JobInputError) as ei:
        run_stage(spec, ExecutionConfig(device="cpu", timeout_s=120), log=lambda line: None)
    msg = str(ei.value)
    assert "one optimizer step needs 4096" in msg and "micro_batch_size" in msg
    assert "\n" not in msg.strip() and "Traceback" not in msg


@pytest.mark.slow
def test_bad_input_in_a_two_process_job_is_an_input_error(store, data_uri, tmp_path):
    """The same bad input under torchrun (world size 2): torchrun exits with its own code, not the ranks' 2, so
    the launcher goes by the marker a rank writes (`input_error.txt` in the run folder): JobInputError, the
    rank's one line, and no artifact."""
    from rlhf_tasks.errors import JobInputError
    from rlhf_tasks.stage_main import INPUT_ERROR_FILE

    cfg = tiny_cfg(["reward.micro_batch_size=2048", "execution.num_procs=2"])
    spec = make_spec("reward", cfg, store, data_uri, tmp_path / "bad", uuid.uuid4().hex[:24])
    with pytest.raises(JobInputError) as ei:
        run_stage(spec, ExecutionConfig(device="cpu", num_procs=2, timeout_s=180), log=lambda line: None)
    msg = str(ei.value)
    assert msg.startswith("reward: ") and "one optimizer step needs 4096" in msg and "micro_batch_size" in msg
    assert "\n" not in msg.strip() and "Traceback" not in msg
    assert (tmp_path / "bad" / INPUT_ERROR_FILE).read_text().strip() in msg
    assert not store.exists("reward", spec.key)
