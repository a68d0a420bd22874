"""The demo task: a synthetic preference task with a programmatic gold reward, small enough for tiny models.

Prompts ask about one of `TOPICS` ("Describe the cat.", "Tell me about the river.", ...). Answers are short
lowercase word sequences such as "the cat is warm and calm and bright". Every word comes from a small vocabulary,
so the tiny byte-level BPE tokenizer (trained on `tokenizer_corpus()`) encodes each word in one or two tokens.

Gold reward `gold_score(prompt, response)`, bounded in [-2, 2]; with n = number of words:
    +0.4 per DISTINCT positive word (at most 3 count: +1.2)
    +0.6 if the answer mentions the prompt's topic and no other topic (a wrong topic is no worse than none)
    -0.5 per negative word (every occurrence)
    -0.3 per unknown word and per repeat of a content word
    -0.5 per missing word below 4 words (an empty answer scores -2: ending at once is the worst thing to do)
    -0.2 per word above 12 words
The best answers ("the cat is warm and calm and bright") score 1.8. Repetition, gibberish and answers that stop
at once are penalised, so a policy cannot reach the top by spamming one word or by emitting EOS immediately.

Dataset (`generate(n, seed)`), one preference pair per row with `gold: "demo"`:
    answers come in five levels (gold range): good (topic + 2-3 positive words, 1.4..1.8), mediocre (neutral
    words, no topic, or mixed positive/negative, -0.1..0.9), bad (negative words or off topic, -1.0..0.1), short
    (1-3 words, -1.5..-0.4) and rambling (one word repeated, or 14-18 words, -2.0..1.4).
    chosen is good or mediocre (50/50), rejected is a lower level, and every pair has a gold margin >= 0.5.
So SFT on `chosen` imitates a mix of good and mediocre answers and cannot reach the top; a reward model learns
the preference (including "too short is bad") from the pairs; PPO can raise gold by moving toward more distinct
positive words and the topic at a sensible length. Measured with the tiny Llama (hidden 64, 2 layers) on CPU: a
reward model reaches ~99% pairwise accuracy on held-out pairs within a few epochs, but it does not learn to match
the answer's topic to the prompt's; hence a wrong topic only forfeits the topic bonus instead of costing gold, so
a policy steered by such a reward model toward "some topic word" never loses gold by it.

`python -m rlhf_tasks.data.demo` (or scripts/make_demo_data.py) regenerates the shipped file
`rlhf_tasks/data/demo_data/demo.jsonl`.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

TOPICS = ("cat", "dog", "sun", "sea", "tree", "city", "book", "song", "car", "house",
          "park", "cake", "river", "bird", "moon", "road", "garden", "train", "lake", "hill")
POSITIVE = ("good", "great", "nice", "kind", "warm", "bright", "calm", "fresh", "happy", "lovely", "clean", "sweet")
NEGATIVE = ("bad", "sad", "dull", "ugly", "cold", "dark", "awful", "boring", "dirty", "noisy")
NEUTRAL = ("okay", "fine", "plain", "usual", "small", "big")
FILLER = ("the", "this", "it", "is", "looks", "feels", "seems", "and", "very", "so", "quite", "really", "also", "but")
TEMPLATES = ("Describe the {t}.", "Tell me about the {t}.", "What do you think of the {t}?",
             "Write about the {t}.", "How is the {t}?", "Say something about the {t}.")

VOCAB = frozenset(TOPICS + POSITIVE + NEGATIVE + NEUTRAL + FILLER)
CONTENT = frozenset(TOPICS + POSITIVE + NEGATIVE + NEUTRAL)  # words whose repetition is penalised
MIN_WORDS, MAX_WORDS = 4, 12
GOLD_RANGE = (-2.0, 2.0)
DATA_FILE = Path(__file__).resolve().parent / "demo_data" / "demo.jsonl"
DEFAULT_ROWS, DEFAULT_SEED = 3000, 0

_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """Lowercase alphabetic words of a text (punctuation and special tokens are ignored)."""
    return _WORD.findall(text.lower())


def prompt_topic(prompt: str) -> str | None:
    """The topic a prompt asks about: the last topic word in it (None if it names none)."""
    found = [w for w in words(prompt) if w in TOPICS]
    return found[-1] if found else None


def gold_score(prompt: str, response: str) -> float:
    """Programmatic gold reward of `response` to `prompt`, in [-2, 2] (see the module docstring)."""
    ws = words(response)
    n = len(ws)
    counts = Counter(ws)
    topic = prompt_topic(prompt)
    score = 0.4 * min(len(set(ws) & set(POSITIVE)), 3)
    others = [w for w in counts if w in TOPICS and w != topic]
    score += 0.6 if topic is not None and topic in counts and not others else 0.0
    score -= 0.5 * sum(counts[w] for w in NEGATIVE)
    score -= 0.3 * sum(c for w, c in counts.items() if w not in VOCAB)
    score -= 0.3 * sum(c - 1 for w, c in counts.items() if w in CONTENT)
    if n < MIN_WORDS:
        score -= 0.5 * (MIN_WORDS - n)
    elif n > MAX_WORDS:
        score -= 0.2 * (n - MAX_WORDS)
    return round(min(max(score, GOLD_RANGE[0]), GOLD_RANGE[1]), 4)


# ---- answer generators, one per quality level ---------------------------------------------------------------
def _sentence(rng: random.Random, subject: str, adjs: list[str]) -> str:
    verb = rng.choice(("is", "looks", "feels", "seems"))
    adv = rng.choice(("", "", "very ", "so ", "quite ", "really "))
    return f"{subject} {verb} {adv}{' and '.join(adjs)}"


def _subject(rng: random.Random, topic: str, mention: bool) -> str:
    return f"{rng.choice(('the', 'this'))} {topic}" if mention else "it"


def answer_good(rng: random.Random, topic: str) -> str:
    adjs = rng.sample(POSITIVE, rng.choice((2, 3)))
    if rng.random() < 0.2:
        adjs.insert(rng.randrange(len(adjs) + 1), rng.choice(NEUTRAL))
    return _sentence(rng, _subject(rng, topic, True), adjs)


def answer_mediocre(rng: random.Random, topic: str) -> str:
    kind = rng.random()
    if kind < 0.4:  # on topic, but only neutral words
        return _sentence(rng, _subject(rng, topic, True), rng.sample(NEUTRAL, rng.choice((1, 2))))
    if kind < 0.7:  # pleasant but never names the topic
        return _sentence(rng, "it", rng.sample(POSITIVE, 1) + rng.sample(NEUTRAL, rng.choice((0, 1))))
    adjs = [rng.choice(POSITIVE), rng.choice(POSITIVE), rng.choice(NEGATIVE)]  # mixed feelings
    rng.shuffle(adjs)
    return _sentence(rng, _subject(rng, topic, True), adjs)


def answer_bad(rng: random.Random, topic: str) -> str:
    if rng.random() < 0.5:
        return _sentence(rng, _subject(rng, topic, rng.random() < 0.5), rng.sample(NEGATIVE, rng.choice((1, 2))))
    other = rng.choice([t for t in TOPICS if t != topic])  # off topic, and not nice about it either
    return _sentence(rng, _subject(rng, other, True), rng.sample(NEUTRAL + NEGATIVE, 2))


def answer_short(rng: random.Random, topic: str) -> str:
    return rng.choice((rng.choice(NEUTRAL), rng.choice(POSITIVE), f"the {topic}", "it is", f"{rng.choice(NEUTRAL)} "
                       f"{rng.choice(NEUTRAL)}", f"it {rng.choice(('is', 'seems'))} {rng.choice(NEUTRAL)}"))


def answer_rambling(rng: random.Random, topic: str) -> str:
    if rng.random() < 0.5:  # one word over and over
        return " ".join([rng.choice(POSITIVE)] * rng.randint(4, 9))
    target = rng.randint(14, 18)  # too long: over MAX_WORDS, but short enough not to be truncated
    parts = [_sentence(rng, _subject(rng, topic, True), [rng.choice(POSITIVE)])]
    while sum(len(p.split()) for p in parts) < target:
        parts.append(_sentence(rng, "it", [rng.choice(NEUTRAL + POSITIVE[:3])]))
    return " ".join(" and ".join(parts).split()[:target])


LEVELS = {"good": answer_good, "mediocre": answer_mediocre, "bad": answer_bad, "short": answer_short,
          "rambling": answer_rambling}
# (chosen level, rejected level, probability)
PAIR_MIX = (("good", "mediocre", 0.26), ("good", "bad", 0.08), ("good", "short", 0.10), ("good", "rambling", 0.06),
            ("mediocre", "bad", 0.20), ("mediocre", "short", 0.18), ("mediocre", "rambling", 0.12))
MIN_MARGIN = 0.5


def make_prompt(rng: random.Random, topic: str | None = None) -> str:
    return rng.choice(TEMPLATES).format(t=topic or rng.choice(TOPICS))


def generate(n: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> list[dict]:
    """`n` distinct preference rows {prompt, chosen, rejected, gold: "demo"}; deterministic for a seed."""
    rng = random.Random(seed)
    kinds, probs = [(c, r) for c, r, _ in PAIR_MIX], [p for _, _, p in PAIR_MIX]
    rows, seen = [], set()
    while len(rows) < n:
        topic = rng.choice(TOPICS)
        prompt = make_prompt(rng, topic)
        good, bad = rng.choices(kinds, probs)[0]
        chosen, rejected = LEVELS[good](rng, topic), LEVELS[bad](rng, topic)
        if gold_score(prompt, chosen) - gold_score(prompt, rejected) < MIN_MARGIN or (prompt, chosen, rejected) in seen:
            continue
        seen.add((prompt, chosen, rejected))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "gold": "demo"})
    return rows


def write_jsonl(rows: list[dict], path: str | Path = DATA_FILE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def tokenizer_corpus() -> list[str]:
    """Text the tiny BPE tokenizer is trained on: every prompt in the DS-Chat format and answer-like sentences over
    the whole vocabulary, so each demo word is one token. Built from the word lists only (no sampling), so the
    tokenizer changes only when the vocabulary does."""
    lines = [" Human: " + t.format(t=topic) + " Assistant:" for t in TEMPLATES for topic in TOPICS]
    adjs = POSITIVE + NEUTRAL + NEGATIVE
    for i, topic in enumerate(TOPICS):
        for j, a in enumerate(adjs):
            subject = ("the", "this", "it")[(i + j) % 3]
            subject = "it" if subject == "it" else f"{subject} {topic}"
            verb, adv = FILLER[3 + (i + j) % 4], ("very", "so", "quite", "really", "also")[j % 5]
            lines.append(f" {subject} {verb} {adv} {a} and {adjs[(i * 7 + j * 5) % len(adjs)]} but {topic}")
    lines += [" " + " ".join(sorted(VOCAB))] * 20
    return lines


def stats(rows: list[dict]) -> dict:
    """Mean gold of chosen / rejected answers and the pairwise margin (for the docs and tests)."""
    gc = [gold_score(r["prompt"], r["chosen"]) for r in rows]
    gr = [gold_score(r["prompt"], r["rejected"]) for r in rows]
    return {"rows": len(rows), "gold_chosen_mean": sum(gc) / len(gc), "gold_rejected_mean": sum(gr) / len(gr),
            "margin_min": min(c - r for c, r in zip(gc, gr)), "chosen_at_top": sum(c >= 1.7 for c in gc) / len(gc),
            "gold_max": max(gc)}


if __name__ == "__main__":
    rows = generate()
    print(write_jsonl(rows), json.dumps(stats(rows), indent=1))
