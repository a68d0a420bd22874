"""The constraints task: instruction following with a programmatic checker, for real pretrained models.

Every prompt asks for one short sentence about a topic under four explicit, checkable rules, e.g.
    Write one sentence about the ocean. Rules: use the word "waves"; use 4 to 8 words; write only in lowercase;
    end with a question mark.
Gold reward `gold_score(prompt, response)` in [0, 1]: the fraction of the four rules the answer meets,
    keyword   the answer contains the asked word (whole word, any case)
    length    it has between MIN_WORDS (4) and the asked maximum (8, 10 or 12) words
    lowercase it has letters and none of them is uppercase
    question  it ends with "?"
and 0 for a degenerate answer (fewer than 60% of its words distinct), so repeating the keyword until the length
fits is worth nothing, while a long natural sentence (a few "the"s) is not degenerate. The rules are read from the
prompt itself (`prompt_rules`), so the scorer needs nothing but the prompt and the answer.

Dataset (`generate(n, seed)`), one preference pair per row with `gold: "constraints"`: answers are sentences from
templates over per-topic nouns, in which each rule is switched on or off on its own (right or wrong noun; 4 to N
words, else a fragment or a sentence padded with a clause; lowercase or sentence case; question or statement).
`chosen` meets 2 to 4 rules, `rejected` fewer (or is degenerate); every pair differs by at least one rule. Chosen
answers meet the keyword and length rules 95% of the time but the lowercase and question rules only 47% of the
time each (`CHOSEN_MIX`).

Why it is a fair test of step 3 on a real model (SmolLM2-135M-Instruct):
  - the model does not already solve it: untrained, it writes capitalised statements, mostly too long and never a
    question (measured: greedy gold 0.23 on 16 held-out prompts);
  - SFT on the chosen answers (mixed-quality demonstrations) learns the format but imitates the mix: the modal
    demonstration breaks the lowercase and question rules, so greedy SFT stays well below 1 (a clear gap);
  - the preference is learnable: pairs differ by whole rules that show in the tokens (a final "?", capitals, the
    prompt's word, length); measured, 4 LoRA reward-model steps take held-out pairwise accuracy from 0.28 to 0.85;
  - the gold scorer is independent of the reward model: it is this file's string checks, and PPO never sees it
    (the reward model is all PPO optimises);
  - it is meant to be within reach of a 135M model in a few hundred PPO samples on CPU: every rule is met by a
    large share of the demonstrations, so the SFT policy's samples meet it often and the reward signal is dense;
    PPO only has to shift modes (capitalised statement -> lowercase question), not discover a new behaviour.

`python -m rlhf_tasks.data.constraints` (or scripts/make_demo_data.py --task constraints) regenerates the shipped
file `rlhf_tasks/data/constraints_data/constraints.jsonl`.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

TOPICS = {  # topic phrase -> nouns that fit it (the keyword is one of them; a wrong answer uses another)
    "the ocean": ("waves", "salt", "sand", "tides", "boats"),
    "a forest": ("trees", "moss", "birds", "leaves", "shade"),
    "the city": ("lights", "streets", "noise", "towers", "buses"),
    "winter": ("snow", "ice", "frost", "scarves", "fires"),
    "a garden": ("roses", "soil", "bees", "weeds", "seeds"),
    "the night sky": ("stars", "clouds", "planets", "silence", "darkness"),
    "a kitchen": ("bread", "spices", "steam", "knives", "pans"),
    "the mountains": ("rocks", "paths", "wind", "peaks", "goats"),
    "a library": ("books", "shelves", "dust", "readers", "pages"),
    "the river": ("fish", "stones", "bridges", "currents", "reeds"),
    "a school": ("teachers", "desks", "lessons", "friends", "chalk"),
    "the desert": ("dunes", "heat", "camels", "cactus", "sun"),
    "a farm": ("cows", "hay", "tractors", "barns", "eggs"),
    "the morning": ("coffee", "light", "birdsong", "dew", "alarms"),
    "a train station": ("tickets", "crowds", "platforms", "clocks", "luggage"),
    "the rain": ("puddles", "umbrellas", "thunder", "drops", "mud"),
}
MAX_WORD_CHOICES = (8, 10, 12)
MIN_WORDS = 4
MIN_DISTINCT_SHARE = 0.6  # below this share of distinct words an answer is degenerate (scores 0)
RULES = ("keyword", "length", "lowercase", "question")
PROMPT_TEMPLATES = (
    'Write one sentence about {topic}. Rules: use the word "{kw}"; use {lo} to {hi} words; write only in '
    'lowercase; end with a question mark.',
    'Write about {topic} in one sentence of {lo} to {hi} words. It must contain the word "{kw}", be all '
    'lowercase, and end with a question mark.',
    'In {lo} to {hi} words, all in lowercase, write one sentence about {topic} that uses the word "{kw}" and '
    'ends with a question mark.',
)
STATEMENTS = ("{t} is full of {x}", "i love the {x} of {t}", "{t} always reminds me of {x}",
              "there are so many {x} in {t}", "the {x} make {t} feel alive", "we found {x} all over {t}")
QUESTIONS = ("is {t} full of {x}", "do you love the {x} of {t}", "does {t} remind you of {x}",
             "why are there so many {x} in {t}", "do the {x} make {t} feel alive", "where are the {x} in {t}")
PADDING = ("and it makes me feel calm and happy every single day", "when the sun goes down and the air gets cool",
           "even on the longest and quietest days of the year", "and i think about it every time i close my eyes")
FRAGMENTS = ("{x}", "the {x}", "so many {x}", "why {x}")  # under MIN_WORDS: how an answer breaks the length rule
SHORT_SHARE = 0.3  # of the answers that break the length rule, this share is too short (the rest too long)
DATA_FILE = Path(__file__).resolve().parent / "constraints_data" / "constraints.jsonl"
DEFAULT_ROWS, DEFAULT_SEED = 3000, 0
GOLD_RANGE = (0.0, 1.0)

_KEYWORD = re.compile(r'the word "([^"]+)"')
_RANGE = re.compile(r"(\d+) to (\d+) words")
_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text: str) -> list[str]:
    """The words of a text: runs of letters, digits and apostrophes (punctuation is not a word)."""
    return _WORD.findall(text)


def prompt_rules(prompt: str) -> tuple[str, int, int]:
    """(keyword, min words, max words) asked by a prompt of this task. ValueError for any other prompt."""
    kw, span = _KEYWORD.search(prompt), _RANGE.search(prompt)
    if kw is None or span is None:
        raise ValueError(f"not a constraints-task prompt: {prompt[:80]!r}")
    return kw.group(1).lower(), int(span.group(1)), int(span.group(2))


def rules_met(prompt: str, response: str) -> dict[str, bool]:
    """Which of the four rules (`RULES`) the response meets."""
    kw, lo, hi = prompt_rules(prompt)
    ws = [w.lower() for w in words(response)]
    text = response.strip()
    letters = [c for c in text if c.isalpha()]
    return {"keyword": kw in ws, "length": lo <= len(ws) <= hi,
            "lowercase": bool(letters) and not any(c.isupper() for c in letters), "question": text.endswith("?")}


def is_degenerate(response: str) -> bool:
    """Repetition rather than a sentence: fewer than `MIN_DISTINCT_SHARE` of the words are distinct."""
    ws = [w.lower() for w in words(response)]
    return bool(ws) and len(set(ws)) < MIN_DISTINCT_SHARE * len(ws)


def gold_score(prompt: str, response: str) -> float:
    """Fraction of the prompt's four rules the response meets, in [0, 1]; 0 when degenerate."""
    if is_degenerate(response):
        return 0.0
    met = rules_met(prompt, response)
    return sum(met.values()) / len(met)


# ---- answers with each rule switched on or off ---------------------------------------------------------------
def make_answer(rng: random.Random, topic: str, kw: str, hi: int, want: dict[str, bool]) -> str:
    """A sentence about `topic` that meets exactly the rules in `want` (keyword, length, lowercase, question)."""
    noun = kw if want["keyword"] else rng.choice([n for n in TOPICS[topic] if n != kw])
    fits = [t.format(t=topic, x=noun) for t in (QUESTIONS if want["question"] else STATEMENTS)]
    text = rng.choice([t for t in fits if MIN_WORDS <= len(words(t)) <= hi])
    if not want["length"] and rng.random() < SHORT_SHARE:  # too short: a fragment
        text = rng.choice(FRAGMENTS).format(x=noun)
    elif not want["length"]:  # too long: pad past the maximum with a clause (or two)
        pads = rng.sample(PADDING, 2)
        text = f"{text} {pads[0]}"
        if len(words(text)) <= hi:
            text = f"{text} {pads[1]}"
    text += "?" if want["question"] else "."
    if not want["lowercase"]:
        text = text[0].upper() + text[1:]
        text = re.sub(r"\bi\b", "I", text)
    return text


def degenerate_answer(rng: random.Random, topic: str, kw: str) -> str:
    """The keyword over and over (what a reward hacker might write)."""
    return " ".join([kw] * rng.randint(4, 7)) + "?"


# (probability, rules the chosen answer meets): keyword and length 95% of the time, lowercase and question 47%
# each, so the modal demonstration is a capitalised statement that breaks two rules.
CHOSEN_MIX = (
    (0.12, {"keyword", "length", "lowercase", "question"}),
    (0.25, {"keyword", "length", "lowercase"}),
    (0.25, {"keyword", "length", "question"}),
    (0.28, {"keyword", "length"}),
    (0.05, {"length", "lowercase", "question"}),
    (0.05, {"keyword", "lowercase", "question"}),
)


def make_prompt(rng: random.Random) -> tuple[str, str, str, int]:
    """(prompt, topic, keyword, max words)."""
    topic = rng.choice(sorted(TOPICS))
    kw, hi = rng.choice(TOPICS[topic]), rng.choice(MAX_WORD_CHOICES)
    return rng.choice(PROMPT_TEMPLATES).format(topic=topic, kw=kw, lo=MIN_WORDS, hi=hi), topic, kw, hi


def generate(n: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> list[dict]:
    """`n` distinct preference rows {prompt, chosen, rejected, gold: "constraints"}; deterministic for a seed."""
    rng = random.Random(seed)
    probs, patterns = [p for p, _ in CHOSEN_MIX], [s for _, s in CHOSEN_MIX]
    rows, seen = [], set()
    while len(rows) < n:
        prompt, topic, kw, hi = make_prompt(rng)
        good = rng.choices(patterns, probs)[0]
        chosen = make_answer(rng, topic, kw, hi, {r: r in good for r in RULES})
        if rng.random() < 0.15:
            rejected = degenerate_answer(rng, topic, kw)
        else:  # drop 1-3 of the chosen rules (and never add one)
            keep = set(rng.sample(sorted(good), rng.randint(0, len(good) - 1)))
            rejected = make_answer(rng, topic, kw, hi, {r: r in keep for r in RULES})
        if gold_score(prompt, chosen) <= gold_score(prompt, rejected) or (prompt, chosen, rejected) in seen:
            continue
        seen.add((prompt, chosen, rejected))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "gold": "constraints"})
    return rows


def stats(rows: list[dict]) -> dict:
    """Mean gold of chosen / rejected answers and how often chosen answers meet each rule (docs and tests)."""
    gc = [gold_score(r["prompt"], r["chosen"]) for r in rows]
    gr = [gold_score(r["prompt"], r["rejected"]) for r in rows]
    met = [rules_met(r["prompt"], r["chosen"]) for r in rows]
    return {"rows": len(rows), "gold_chosen_mean": sum(gc) / len(gc), "gold_rejected_mean": sum(gr) / len(gr),
            "margin_min": min(c - r for c, r in zip(gc, gr)), "chosen_at_top": sum(c == 1.0 for c in gc) / len(gc),
            **{f"chosen_{rule}": sum(m[rule] for m in met) / len(met) for rule in RULES}}


if __name__ == "__main__":
    from .demo import write_jsonl  # the shipped tasks' one JSONL writer

    rows = generate()
    print(write_jsonl(rows, DATA_FILE), json.dumps(stats(rows), indent=1))
