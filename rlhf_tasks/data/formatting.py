"""Prompt formatting and tokenization shared by the data stage, evaluation and chat.

Two prompt formats:
  - the tokenizer's chat template when it has one (`apply_chat_template(..., add_generation_prompt=True)`);
  - else DeepSpeed-Chat's plain format: " Human: {prompt} Assistant:" (one pair per turn), and the answer follows
    after one space.
Responses are tokenized on their own and always END WITH EOS, so the policy learns to stop. Padding is never added
here: batches pad later and mark padding with attention masks only (pad may equal EOS in some tokenizers).
"""
from __future__ import annotations

import re

_HH_MARK = re.compile(r"(?:^|\n\n|\n|(?<=\s))(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def parse_transcript(prompt: str) -> list[dict] | None:
    """Split an Anthropic-HH style transcript ("\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: ...\\n\\nAssistant:")
    into turns; None if `prompt` is not one (it must start with "Human:"). A trailing empty assistant turn is
    dropped: it is the generation prompt."""
    if not prompt.lstrip().startswith("Human:"):
        return None
    marks = list(_HH_MARK.finditer(prompt))
    turns = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(prompt)
        turns.append({"role": _ROLES[m.group(1)], "content": prompt[m.end():end].strip()})
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns or None


def format_conversation(tokenizer, turns: list[dict]) -> str:
    """Render turns [{role: system|user|assistant, content}] as the model's prompt text. When the last turn is the
    user's, the text ends where the assistant's answer starts (generation prompt)."""
    open_end = bool(turns) and turns[-1]["role"] != "assistant"
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=open_end)
    parts = []
    for t in turns:
        if t["role"] == "system":
            parts.append(f" {t['content']}")
        else:
            parts.append(f" {'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}")
    if open_end:
        parts.append(" Assistant:")
    return "".join(parts)


def format_prompt(tokenizer, prompt: str) -> str:
    """The text a model sees before its answer to `prompt` (a plain question or an HH transcript)."""
    turns = parse_transcript(prompt) or [{"role": "user", "content": prompt.strip()}]
    return format_conversation(tokenizer, turns)


def response_prefix(tokenizer) -> str:
    """What separates the prompt text from the answer: one space in the DS-Chat format, nothing after a chat
    template (its generation prompt ends with the separator)."""
    return "" if has_chat_template(tokenizer) else " "


def tokenize_prompts(tokenizer, prompt_texts: list[str]) -> list[list[int]]:
    """Token ids of formatted prompts. Chat templates already carry their special tokens; the plain format gets
    the tokenizer's usual ones (e.g. BOS)."""
    if not prompt_texts:
        return []
    special = not has_chat_template(tokenizer)
    return tokenizer(list(prompt_texts), add_special_tokens=special)["input_ids"]


def tokenize_responses(tokenizer, responses: list[str], max_len: int | None) -> list[list[int]]:
    """Token ids of answers, truncated to `max_len` tokens INCLUDING the final EOS that every answer ends with
    (None: no limit)."""
    if not responses:
        return []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; answers must end with one")
    prefix = response_prefix(tokenizer)
    ids = tokenizer([prefix + r for r in responses], add_special_tokens=False)["input_ids"]
    return [clip_response(x, max_len, eos) for x in ids]


def clip_response(ids: list[int], max_len: int | None, eos: int) -> list[int]:
    """Append EOS, keeping at most `max_len` tokens in all (the EOS always survives truncation)."""
    ids = list(ids)
    if max_len is not None and len(ids) >= max_len:
        ids = ids[: max_len - 1]
    return ids + [eos]


def tokenize_example(tokenizer, prompt: str, response: str | None = None, max_response_len: int = 256) -> dict:
    """One example: {prompt_text, prompt_ids, response_ids (ends with EOS) or None}."""
    text = format_prompt(tokenizer, prompt)
    response_ids = None if response is None else tokenize_responses(tokenizer, [response], max_response_len)[0]
    return {"prompt_text": text, "prompt_ids": tokenize_prompts(tokenizer, [text])[0], "response_ids": response_ids}
