"""`rlhf chat` (interactive, multi-turn, streamed) and `rlhf generate` (a file of prompts, JSONL out).

Models: a store URI, a local HF folder, a hub name or `tiny:<arch>` (models.resolve_model); a PPO artifact is
loaded from its `actor/` folder. Prompts use the tokenizer's chat template when it has one, else DeepSpeed-Chat's
" Human: ... Assistant:" format (the one the pipeline trained on).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

import torch

from .. import models
from ..data.formatting import format_conversation, format_prompt, has_chat_template, tokenize_prompts
from ..errors import StoreError, UserError
from . import generation
from .stage import pick_device, policy_folder

HUMAN = "Human:"


# ---- loading and formatting -----------------------------------------------------------------------------
def load_policy(ref: str, device: torch.device | None = None):
    """(model, tokenizer, folder) for a model reference; a PPO artifact resolves to its actor/."""
    try:
        resolved = models.resolve_model(ref)
    except StoreError as e:
        raise UserError(f"--model {ref}: {e}") from None
    path = str(policy_folder(Path(resolved))) if Path(resolved).is_dir() else resolved  # else a hub name
    device = device or pick_device()
    _quiet_transformers()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        tok = models.load_tokenizer(path, padding_side="left")
        model = models.load_causal_lm(path, dtype=dtype, dropout=0.0).to(device)
    except OSError as e:
        raise UserError(f"--model {ref}: cannot load a causal LM from it ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, tok, path


def _quiet_transformers() -> None:
    """No weight-loading progress bars or advisory warnings in an interactive terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def prompt_ids_for(tokenizer, turns: list[dict]) -> list[int]:
    """Token ids of a conversation ending with a user turn, formatted and tokenized exactly as the data stage
    does it (chat template, else the " Human: ... Assistant:" format)."""
    return tokenize_prompts(tokenizer, [format_conversation(tokenizer, turns)])[0]


def stop_strings(tokenizer) -> list[str]:
    """Text that ends an answer besides EOS: the next ' Human:' turn in the plain format."""
    return [] if has_chat_template(tokenizer) else [HUMAN]


def sampling_config(args, tokenizer):
    """GenerationConfig from the CLI flags (temperature 0 = greedy, top-k 0 = off)."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("sampling flags: need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    do_sample = args.temperature > 0
    return generation.generation_config(tokenizer, max_new_tokens=args.max_new_tokens, do_sample=do_sample,
                                        temperature=args.temperature if do_sample else 1.0,
                                        top_p=args.top_p, top_k=args.top_k, stop_strings=stop_strings(tokenizer))


def max_context(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048)
    return int(min(n, 1_000_000))


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ---- streaming ------------------------------------------------------------------------------------------
class TokenPrinter:
    """A transformers streamer (put/end) that decodes the growing answer and writes only new, settled text:
    it holds back an incomplete UTF-8 character and any tail that may be the start of a stop string, and
    writes nothing from a stop string on."""

    def __init__(self, tokenizer, write: Callable[[str], None], stops: list[str]):
        self.tok, self.write, self.stops = tokenizer, write, stops
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def text(self) -> str:
        return cut_at_stop(self._decoded(), self.stops)[0].rstrip()

    def _decoded(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True).lstrip()  # the answer starts after a space

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        text, self.stopped = cut_at_stop(self._decoded(), self.stops)
        if not final and not self.stopped:
            if text.endswith("\ufffd"):
                return
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)


# ---- chat -----------------------------------------------------------------------------------------------
class ChatSession:
    """A multi-turn conversation with one model. `reply(text, write)` streams the answer through `write` and
    returns it; the oldest turns are dropped when the prompt would not fit the model's context."""

    def __init__(self, model, tokenizer, gen_cfg, device: torch.device):
        self.model, self.tok, self.gen_cfg, self.device = model, tokenizer, gen_cfg, device
        self.turns: list[dict] = []
        self.stops = stop_strings(tokenizer)

    def reset(self) -> None:
        self.turns = []

    def _prompt_ids(self, turns: list[dict]) -> list[int]:
        budget = max_context(self.model, self.tok) - self.gen_cfg.max_new_tokens
        while True:
            ids = prompt_ids_for(self.tok, turns)
            if len(ids) <= budget or len(turns) <= 1:
                return ids[-budget:] if budget > 0 else ids
            turns = turns[2:] if len(turns) > 2 else turns[-1:]  # drop the oldest exchange

    @torch.no_grad()
    def reply(self, text: str, write: Callable[[str], None]) -> str:
        turns = self.turns + [{"role": "user", "content": text}]
        ids = torch.tensor([self._prompt_ids(turns)], device=self.device)
        printer = TokenPrinter(self.tok, write, self.stops)
        extra = {"tokenizer": self.tok} if self.stops else {}
        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self.gen_cfg,
                            streamer=printer, **extra)
        answer = printer.text()
        self.turns = turns + [{"role": "assistant", "content": answer}]
        return answer


def chat_loop(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
              prompt: str = "you> ", bot: str = "bot> ") -> int:
    """Read lines until /quit or EOF; `/reset` clears the history. Ctrl-C during an answer abandons that turn."""

    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    interactive = stdin is sys.stdin
    while True:
        try:
            if interactive:
                line = input(prompt)
            else:
                write(prompt)
                line = stdin.readline()
                if not line:
                    raise EOFError
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            write("(conversation cleared)\n")
            continue
        if text.startswith("/"):
            write("commands: /reset clears the conversation, /quit exits\n")
            continue
        write(bot)
        try:
            session.reply(text, write)
        except KeyboardInterrupt:
            write(" [interrupted]")
        write("\n")


# ---- batch generation -----------------------------------------------------------------------------------
def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a JSONL file (a `prompt` field, or a JSON string per
    line). Errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {path}: no such file")
    prompts: list[str] = []
    jsonl = p.suffix in (".jsonl", ".json")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{n}: not valid JSON") from None
        value = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{path}:{n}:prompt: missing or not a non-empty string")
        prompts.append(value)
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return prompts


def generate_answers(model, tok, prompts: list[str], gen_cfg, *, batch_size: int, device: torch.device,
                     seed: int | None = None) -> list[dict]:
    """Answer each prompt (single turn). Records: prompt, response, tokens (answer length), eos (ended by EOS)."""
    stops = stop_strings(tok)
    budget = max_context(model, tok) - gen_cfg.max_new_tokens
    texts = [format_prompt(tok, p) for p in prompts]  # as the data stage formats a prompt (HH transcripts too)
    ids = [x[-max(budget, 1):] for x in tokenize_prompts(tok, texts)]
    resp = generation.generate(model, tok, ids, batch_size=batch_size, device=device, gen_cfg=gen_cfg, seed=seed)
    out = []
    for p, r in zip(prompts, resp):
        text, _ = cut_at_stop(tok.decode(r, skip_special_tokens=True), stops)
        out.append({"prompt": p, "response": text.strip(), "tokens": len(r),
                    "eos": bool(r) and r[-1] == tok.eos_token_id})
    return out
