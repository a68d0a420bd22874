"""`rlhf chat` through a pseudo-terminal, the streaming printer, and `rlhf generate` on a small file.

The model is a tiny llama taught the demo task for a few hundred optimizer steps in the fixture (test setup), so
its answers are demo sentences that end with EOS rather than random tokens.
"""
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_tasks import models
from rlhf_tasks.cli import main
from rlhf_tasks.config import TinyModelConfig
from rlhf_tasks.data import demo
from rlhf_tasks.data.formatting import tokenize_example
from rlhf_tasks.evaluation import chat

ROOT = Path(__file__).resolve().parent.parent
SHAPE = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)



@pytest.fixture(scope="module")
def taught_model(tmp_path_factory) -> Path:
    """A tiny llama fine-tuned on good demo answers (prompt tokens masked out of the loss)."""
    out = tmp_path_factory.mktemp("chat-model") / "model"
    base = models.ensure_tiny_model("llama", SHAPE)
    tok = models.load_tokenizer(str(base))
    model = models.load_causal_lm(str(base), dropout=0.0)
    rng = __import__("random").Random(0)
    seqs = []
    for _ in range(256):
        topic = rng.choice(demo.TOPICS)
        ex = tokenize_example(tok, demo.make_prompt(rng, topic), demo.answer_good(rng, topic), 24)
        seqs.append((ex["prompt_ids"], ex["response_ids"]))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(120):
        batch = [seqs[(step * 16 + i) % len(seqs)] for i in range(16)]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((16, width), tok.pad_token_id)
        mask = torch.zeros((16, width), dtype=torch.long)
        labels = torch.full((16, width), -100)
        for i, (p, r) in enumerate(batch):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            mask[i, :n] = 1
            labels[i, len(p):n] = torch.tensor(r)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _demo_words_only(text: str) -> bool:
    words = demo.words(text)
    return bool(words) and all(w in demo.VOCAB for w in words)


# ---- pseudo-terminal ------------------------------------------------------------------------------------
class Pty:
    """A child process on a pseudo-terminal: send lines, wait for output patterns."""

    def __init__(self, argv: list[str]):
        self.master, slave = os.openpty()
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TERM="dumb")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.buf = ""

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.time() + timeout
        rx = re.compile(pattern, re.S)
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{self.buf[-2000:]}")
            r, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data and self.proc.poll() is not None:
                    raise AssertionError(f"process exited ({self.proc.returncode}) before {pattern!r}:\n{self.buf}")
                self.buf += data.decode("utf-8", "replace")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.time() + timeout
        while self.proc.poll() is None and time.time() < deadline:
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    self.buf += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:
                    pass
        return self.proc.wait(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def _chat_argv(model: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf_tasks.cli", "chat", "--model", str(model), "--temperature", "0",
            "--max-new-tokens", "24"]


def test_chat_in_a_terminal_answers_resets_and_quits(taught_model):
    model, tok, _ = chat.load_policy(str(taught_model), torch.device("cpu"))
    expected = chat.generate_answers(model, tok, ["Describe the cat."], _greedy(tok), batch_size=1,
                                     device=torch.device("cpu"))[0]["response"]
    t = Pty(_chat_argv(taught_model))
    try:
        t.expect(r"/quit")  # the banner
        t.expect(r"you> ")
        t.send("Describe the cat.\n")
        answer = t.expect(r"bot> (.*?)\r?\nyou> ").group(1).strip()
        print("chat answer:", answer)
        assert answer == expected and _demo_words_only(answer), answer
        t.send("/reset\n")
        t.expect(r"\(conversation cleared\)\r?\nyou> ")
        t.send("How is the moon?\n")
        assert _demo_words_only(t.expect(r"bot> (.*?)\r?\nyou> ").group(1))
        t.send("/quit\n")
        assert t.wait() == 0
        assert "Traceback" not in t.buf
    finally:
        t.close()


def test_chat_exits_cleanly_on_eof(taught_model):
    t = Pty(_chat_argv(taught_model))
    try:
        t.expect(r"you> ")
        t.send("\x04")  # Ctrl-D at an empty prompt
        assert t.wait() == 0
        assert "Traceback" not in t.buf
    finally:
        t.close()


# ---- in process ---------------------------------------------------------------------------------------
def _greedy(tok, max_new_tokens=24):
    return chat.sampling_config(type("A", (), {"temperature": 0, "top_p": 1.0, "top_k": 0,
                                               "max_new_tokens": max_new_tokens})(), tok)


def test_session_streams_what_it_returns_and_keeps_history(taught_model):
    model, tok, _ = chat.load_policy(str(taught_model), torch.device("cpu"))
    session = chat.ChatSession(model, tok, _greedy(tok), torch.device("cpu"))
    pieces: list[str] = []
    answer = session.reply("Tell me about the river.", pieces.append)
    assert "".join(pieces) == answer and len(pieces) > 1  # streamed in several pieces
    single = chat.generate_answers(model, tok, ["Tell me about the river."], _greedy(tok), batch_size=1,
                                   device=torch.device("cpu"))[0]
    assert answer == single["response"] and single["eos"]
    session.reply("And the dog?", lambda s: None)
    assert [t["role"] for t in session.turns] == ["user", "assistant", "user", "assistant"]
    assert len(session._prompt_ids(session.turns + [{"role": "user", "content": "x"}])) > 20
    session.reset()
    assert session.turns == []


def test_token_printer_holds_back_stop_strings(taught_model):
    tok = models.load_tokenizer(str(taught_model))
    out: list[str] = []
    printer = chat.TokenPrinter(tok, out.append, ["Human:"])
    printer.put(torch.tensor([[1, 2, 3]]))  # the prompt: ignored
    for t in tok(" the cat is warm Human: and more", add_special_tokens=False)["input_ids"]:
        printer.put(torch.tensor([t]))
    printer.end()
    assert "".join(out) == "the cat is warm " and printer.text() == "the cat is warm"
    assert chat.cut_at_stop("a b Human: c", ["Human:"]) == ("a b ", True)


def test_generate_command_on_a_small_file(taught_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe the cat.\n\nHow is the moon?\nWrite about the garden.\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(taught_model), "--prompts", str(prompts), "--out", str(out),
            "--temperature", "0", "--max-new-tokens", "24", "--batch-size", "2"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Describe the cat.", "How is the moon?", "Write about the garden."]
    assert all(_demo_words_only(r["response"]) and r["eos"] and 0 < r["tokens"] <= 24 for r in rows), rows
    # batching does not change greedy answers; a PPO artifact layout loads its actor/; JSONL prompts to stdout
    ppo = tmp_path / "ppo-artifact"
    shutil.copytree(taught_model, ppo / "actor")
    jl = tmp_path / "prompts.jsonl"
    jl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Describe the cat.", "How is the moon?"]))
    capsys.readouterr()
    assert main(["generate", "--model", str(ppo), "--prompts", str(jl), "--temperature", "0",
                 "--max-new-tokens", "24", "--batch-size", "1"]) == 0
    rows2 = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows2 == rows[:2]
    # bad input: exit 2 naming the file and line
    jl.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["generate", "--model", str(ppo), "--prompts", str(jl)]) == 2
    assert f"{jl}:2:prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(ppo), "--prompts", str(prompts), "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err
