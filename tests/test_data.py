"""Data stage pieces: schema mappings, validation, blending/splitting, formatting, the demo task. Offline, fast."""
import copy
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_tasks.config import config_from_dict
from rlhf_tasks.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
    from rlhf_tasks.data.demo import tokenizer_corpus
    from rlhf_tasks.models import train_tokenizer

    return train_tokenizer(tokenizer_corpus(), 512)


def write_jsonl(path, rows, blank_lines=()):
    lines = []
    for i, r in enumerate(rows):
        if i in blank_lines:
            lines.append("")
        lines.append(r if isinstance(r, str) else json.dumps(r))
    path.write_text("\n".join(lines) + "\n")
    return path


def pairs(n, tag="", start=0):
    return [{"prompt": f"question {tag}{i}", "chosen": f"good answer {tag}{i}", "rejected": f"bad answer {tag}{i}"}
            for i in range(start, start + n)]


def cfg_for(sources, **data):
    return config_from_dict({"data": {"sources": sources, **data}})


def build(cfg, tok):
    from rlhf_tasks.data.stage import build as _build

    b, info, summary = _build(cfg, tok)
    return b, info, summary


def all_rows(b):
    return [r for rows in b.phases.values() for r in rows]


# ---- schema mappings -------------------------------------------------------------------------------------
HH_PROMPT = "\n\nHuman: How do I bake bread?\n\nAssistant: With flour.\n\nHuman: And then?\n\nAssistant:"


@pytest.mark.parametrize("schema", [None, "rm-static", "Dahoas/full-hh-rlhf", "synthetic-instruct-gptj-pairwise",
                                    "yitingxie/rlhf-reward-datasets", "prompt_chosen_rejected"])
def test_prompt_chosen_rejected_schemas(tmp_path, tok, schema):
    rows = [{"prompt": HH_PROMPT if i % 2 else f"plain question {i}", "response": f" r{i}",
             "chosen": f" chosen text {i}", "rejected": f" rejected text {i}"} for i in range(30)]
    src = {"path": str(write_jsonl(tmp_path / "hh.jsonl", rows))}
    if schema:
        src["schema"] = schema
    b, info, _ = build(cfg_for([src], data_split="1,1,1"), tok)
    got = {r.row: r for r in all_rows(b)}
    assert len(got) == 30 and info["sources"]["hh"]["schema"] != "prompt_response"
    assert got[1].chosen == "chosen text 0" and got[1].rejected == "rejected text 0"  # stripped
    assert got[2].prompt_text == " Human: How do I bake bread? Assistant: With flour. Human: And then? Assistant:"
    assert got[1].prompt_text == " Human: plain question 0 Assistant:"
    assert got[1].chosen_ids[-1] == tok.eos_token_id and got[1].rejected_ids[-1] == tok.eos_token_id


def test_webgpt_schema_scores_ties_and_citations(tmp_path, tok):
    rows = []
    for i in range(40):
        s0, s1 = (1.0, -1.0) if i % 3 == 0 else ((0.0, 0.0) if i % 3 == 1 else (-0.5, 0.5))
        rows.append({"question": {"full_text": f"why {i}?", "id": str(i)}, "quotes_0": {}, "answer_0": f"first {i} [1]",
                     "tokens_0": [], "score_0": s0, "answer_1": f"second {i} [2, 3]", "tokens_1": [], "score_1": s1})
    path = write_jsonl(tmp_path / "webgpt.jsonl", rows)
    b, info, summary = build(cfg_for([{"path": str(path)}], data_split="1,1,1", eval_fraction=0.0), tok)
    got = {r.row: r for r in all_rows(b)}
    assert info["sources"]["webgpt"]["schema"] == "webgpt_comparisons"
    assert summary["ties"] == info["sources"]["webgpt"]["ties"] == sum(1 for i in range(40) if i % 3 == 1)
    assert got[1].prompt == "why 0?" and got[1].chosen == "first 0" and got[1].rejected == "second 0"
    assert got[3].chosen == "second 2" and got[3].rejected == "first 2"


def test_shp_schema_labels(tmp_path, tok):
    rows = [{"post_id": str(i), "history": f"post {i}", "human_ref_A": f"reply a {i}", "human_ref_B": f"reply b {i}",
             "labels": i % 2, "score_A": 3, "score_B": 1} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shp.parquet")
    b, info, _ = build(cfg_for([{"path": str(tmp_path / "shp.parquet")}], data_split="1,1,1"), tok)
    got = {r.row: r for r in all_rows(b)}
    assert info["sources"]["shp"]["schema"] == "shp"
    assert (got[2].chosen, got[2].rejected) == ("reply a 1", "reply b 1")  # labels == 1: A preferred
    assert (got[1].chosen, got[1].rejected) == ("reply b 0", "reply a 0")


def test_local_jsonfile_layout_keeps_its_eval_split(tmp_path, tok):
    folder = tmp_path / "mydata" / "data"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps(pairs(40, "t")))
    (folder / "eval.json").write_text(json.dumps(pairs(12, "e")))
    b, info, _ = build(cfg_for([{"path": str(tmp_path / "mydata")}], data_split="1,1,1"), tok)
    assert info["sources"]["mydata"]["has_eval_split"] and info["sources"]["mydata"]["read"] == {"train": 40,
                                                                                                 "eval": 12}
    for (phase, split), rows in b.phases.items():
        assert rows and all(("e" in r.prompt.split()[-1]) == (split == "eval") for r in rows)
    assert sum(len(b.phases[(p, "eval")]) for p in ("sft", "reward", "ppo")) == 12


def test_csv_and_folder_with_split_files(tmp_path, tok):
    d = tmp_path / "folder"
    d.mkdir()
    for name, rows in (("train-00000.csv", pairs(30, "a")), ("test.csv", pairs(9, "z"))):
        with open(d / name, "w") as f:
            f.write("prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n"
                                                         for r in rows))
    b, info, _ = build(cfg_for([{"path": str(d)}], data_split="1,1,1"), tok)
    assert info["sources"]["folder"]["read"] == {"train": 30, "eval": 9}
    assert sum(len(rows) for (ph, s), rows in b.phases.items() if s == "eval") == 9


@pytest.mark.parametrize("fields,rows,expect", [
    ({"prompt": "q", "chosen": "good", "rejected": "bad"},
     [{"q": "p{i}", "good": "yes {i}", "bad": "no {i}"}], ("yes", "no")),
    ({"prompt": "q", "response_a": "x", "response_b": "y", "score_a": "sx", "score_b": "sy"},
     [{"q": "p{i}", "x": "xx {i}", "y": "yy {i}", "sx": 0.1, "sy": 0.9}], ("yy", "xx")),
    ({"prompt": "q", "response_a": "x", "response_b": "y", "label": "pref"},
     [{"q": "p{i}", "x": "xx {i}", "y": "yy {i}", "pref": "a"}], ("xx", "yy")),
    ({"prompt": "q", "response_a": "x", "response_b": "y", "label": "pref"},
     [{"q": "p{i}", "x": "xx {i}", "y": "yy {i}", "pref": 1}], ("yy", "xx")),
    ({"prompt": "meta.text"},
     [{"meta": {"text": "p{i}"}, "chosen": "c {i}", "rejected": "r {i}"}], ("c", "r")),
])
def test_custom_field_mappings(tmp_path, tok, fields, rows, expect):
    data = [{k: (v.format(i=i) if isinstance(v, str) else ({kk: vv.format(i=i) for kk, vv in v.items()}
                                                           if isinstance(v, dict) else v))
             for k, v in rows[0].items()} for i in range(30)]
    path = write_jsonl(tmp_path / "custom.jsonl", data)
    b, _, _ = build(cfg_for([{"path": str(path), "fields": fields}], data_split="1,1,1"), tok)
    r = next(r for r in all_rows(b) if r.row == 4)
    assert r.prompt == "p3" and r.chosen.split()[0] == expect[0] and r.rejected.split()[0] == expect[1]


def test_sft_only_prompt_response_source(tmp_path, tok):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)])
    pref = write_jsonl(tmp_path / "pref.jsonl", pairs(60))
    b, info, _ = build(cfg_for([{"path": str(pref)}, {"path": str(sft), "sft_only": True}]), tok)
    assert info["sources"]["sft"]["schema"] == "prompt_response"
    for (phase, split), rows in b.phases.items():
        from_sft = [r for r in rows if r.source == "sft"]
        if phase != "sft":
            assert not from_sft
        assert all(r.rejected is None and r.rejected_ids is None for r in from_sft)
    assert len([r for r in all_rows(b) if r.source == "sft"]) == 20
    with pytest.raises(DataError, match="sft_only"):  # one response per prompt cannot feed the reward phase
        build(cfg_for([{"path": str(sft)}]), tok)


def test_unknown_columns_and_bad_fields_are_clear(tmp_path, tok):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"odd: cannot tell the schema .*answer, question"):
        build(cfg_for([{"path": str(path)}]), tok)
    with pytest.raises(DataError, match="needs column"):
        build(cfg_for([{"path": str(path), "schema": "shp"}]), tok)
    with pytest.raises(ConfigError, match=r"fields: unknown key 'answer'"):
        build(cfg_for([{"path": str(path), "fields": {"answer": "x"}}]), tok)
    with pytest.raises(ConfigError, match=r"sources\[0\].path: no such file"):
        build(cfg_for([{"path": str(tmp_path / "nope.jsonl")}]), tok)
    with pytest.raises(ConfigError, match="train.json and eval.json"):
        build(cfg_for([{"path": "local/jsonfile"}]), tok)
    with pytest.raises(ConfigError, match="two sources are named 'odd'"):
        build(cfg_for([{"path": str(path)}, {"path": str(path)}]), tok)


def test_source_gold_setting(tmp_path, tok):
    rows = pairs(30)
    rows[0]["gold"] = "demo"
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    b, _, _ = build(cfg_for([{"path": str(path)}]), tok)
    assert Counter(r.gold for r in all_rows(b)) == {"demo": 1, None: 29}  # the rows' own column
    b, _, _ = build(cfg_for([{"path": str(path), "gold": "demo"}]), tok)
    assert {r.gold for r in all_rows(b)} == {"demo"}
    b, _, _ = build(cfg_for([{"path": str(path), "gold": "none"}]), tok)
    assert {r.gold for r in all_rows(b)} == {None}
    with pytest.raises(ConfigError, match=r"sources\[0\].gold: unknown gold scorer 'exact'"):
        build(cfg_for([{"path": str(path), "gold": "exact"}]), tok)


# ---- validation ------------------------------------------------------------------------------------------
BAD_ROWS = [
    ("missing", {"prompt": "q", "chosen": "c"}, "rejected", "missing value"),
    ("missing", {"prompt": None, "chosen": "c", "rejected": "r"}, "prompt", "missing value"),
    ("empty", {"prompt": "q", "chosen": "   ", "rejected": "r"}, "chosen", "empty string"),
    ("not_string", {"prompt": "q", "chosen": 5, "rejected": "r"}, "chosen", "expected a string"),
    ("same_response", {"prompt": "q", "chosen": "same", "rejected": " same"}, "rejected",
     "chosen and rejected are the same"),
    ("duplicate", {"prompt": "question 1", "chosen": "good answer 1", "rejected": "bad answer 1"}, "prompt",
     "duplicate row .*src:2"),
    ("prompt_too_long", {"prompt": "word " * 80, "chosen": "c", "rejected": "r"}, "prompt",
     r"prompt has \d+ tokens, data.max_prompt_len is 40"),
    ("unknown_gold", {"prompt": "q", "chosen": "c", "rejected": "r", "gold": "nope"}, "gold", "unknown gold"),
]


@pytest.mark.parametrize("reason,bad,field,msg", BAD_ROWS, ids=[f"{r[0]}-{r[2]}" for r in BAD_ROWS])
def test_each_validation_error_names_source_row_field(tmp_path, tok, reason, bad, field, msg):
    rows = pairs(30)
    rows.insert(5, bad)  # line 7 (a blank line before it)
    path = write_jsonl(tmp_path / "src.jsonl", rows, blank_lines=(3,))
    with pytest.raises(DataError, match=rf"^src:7:{field}: {msg}"):
        build(cfg_for([{"path": str(path)}], max_prompt_len=40), tok)
    # skip mode: dropped and counted by reason
    b, info, summary = build(cfg_for([{"path": str(path)}], max_prompt_len=40, on_bad_row="skip"), tok)
    assert summary[f"skipped.{reason}"] == 1 and summary["skipped.total"] == 1 and summary["rows.total"] == 30
    assert info["sources"]["src"]["skipped"] == {reason: 1}
    assert info["skipped_examples"][0].startswith(f"src:7:{field}:")


def test_ranked_row_errors(tmp_path, tok):
    rows = [{"q": f"p{i}", "x": f"x{i}", "y": f"y{i}", "l": 0, "s": 1, "t": 2} for i in range(20)]
    rows[2]["l"] = "maybe"
    rows[4]["s"] = "high"
    path = write_jsonl(tmp_path / "rk.jsonl", rows)
    base = {"prompt": "q", "response_a": "x", "response_b": "y"}
    with pytest.raises(DataError, match=r"^rk:3:l: label 'maybe'"):
        build(cfg_for([{"path": str(path), "fields": {**base, "label": "l"}}]), tok)
    with pytest.raises(DataError, match=r"^rk:5:s: expected a number"):
        build(cfg_for([{"path": str(path), "fields": {**base, "score_a": "s", "score_b": "t"}}]), tok)


def test_invalid_json_line_and_empty_phase(tmp_path, tok):
    path = write_jsonl(tmp_path / "broken.jsonl", pairs(5) + ['{"prompt": "q", "chosen": '] + pairs(5, "x"))
    with pytest.raises(DataError, match=r"^broken:6:json: not valid JSON"):
        build(cfg_for([{"path": str(path)}]), tok)
    small = write_jsonl(tmp_path / "small.jsonl", pairs(4))
    with pytest.raises(DataError, match=r"phase \w+/\w+ is empty"):
        build(cfg_for([{"path": str(small)}]), tok)
    b, _, _ = build(cfg_for([{"path": str(small)}], data_split="0,1,0", eval_fraction=0.0), tok)
    assert len(b.phases[("reward", "train")]) == 4  # a phase given no share may stay empty


def test_skip_mode_counts_several_reasons(tmp_path, tok):
    rows = pairs(40) + [{"prompt": "q", "chosen": "", "rejected": "r"}, {"prompt": "q", "chosen": "a", "rejected": "a"},
                        pairs(1)[0], {"prompt": "q", "chosen": 1, "rejected": "r"}, {"prompt": "q2", "chosen": "c"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    b, info, summary = build(cfg_for([{"path": str(path)}], on_bad_row="skip"), tok)
    assert info["skipped"] == {"empty": 1, "same_response": 1, "duplicate": 1, "not_string": 1, "missing": 1}
    assert summary["rows.total"] == 40 and summary["source.mixed.read"] == 45


# ---- blending and splitting ------------------------------------------------------------------------------
def test_blend_counts_follow_weights_and_phases_are_disjoint(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(200, "a"))
    b_ = write_jsonl(tmp_path / "b.jsonl", pairs(400, "b"))
    cfg = cfg_for([{"path": str(a), "weight": 1}, {"path": str(b_), "weight": 3}], data_split="2,4,4")
    b, info, summary = build(cfg, tok)
    per = Counter(r.source for r in all_rows(b))
    assert per["b"] == 400 and abs(per["a"] - 400 / 3) <= 1  # b runs out first; a supplies a quarter
    for (phase, split), rows in b.phases.items():
        c = Counter(r.source for r in rows)
        assert abs(c["b"] - 3 * c["a"]) <= 4, (phase, split, c)
    n = {k: len(v) for k, v in b.phases.items()}
    train = n[("sft", "train")] + n[("reward", "train")] + n[("ppo", "train")]
    assert abs(n[("sft", "train")] / train - 0.2) < 0.01 and abs(n[("reward", "train")] / train - 0.4) < 0.01
    ids = [(r.source, r.row) for r in all_rows(b)]
    assert len(ids) == len(set(ids))  # disjoint: every row in exactly one phase/split
    assert summary["source.a.rows"] == per["a"] and summary["rows.total"] == len(ids)


def test_without_weights_every_row_is_used(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(50, "a"))
    b_ = write_jsonl(tmp_path / "b.jsonl", pairs(150, "b"))
    b, _, _ = build(cfg_for([{"path": str(a)}, {"path": str(b_)}]), tok)
    assert Counter(r.source for r in all_rows(b)) == {"a": 50, "b": 150}
    with pytest.raises(ConfigError, match="weight on every source or on none"):
        build(cfg_for([{"path": str(a), "weight": 1}, {"path": str(b_)}]), tok)


def test_max_rows_caps_a_source(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(100))
    b, _, summary = build(cfg_for([{"path": str(a), "max_rows": 30}]), tok)
    assert summary["source.a.read"] == 30 and max(r.row for r in all_rows(b)) == 30


def test_split_is_deterministic_per_seed(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(120, "a"))
    order = lambda b: {k: [(r.source, r.row) for r in v] for k, v in b.phases.items()}  # noqa: E731
    first = order(build(cfg_for([{"path": str(a)}]), tok)[0])
    assert order(build(cfg_for([{"path": str(a)}]), tok)[0]) == first
    assert order(build(cfg_for([{"path": str(a)}], seed=7), tok)[0]) != first
    # adding a source does not reshuffle the first one's split
    c = write_jsonl(tmp_path / "c.jsonl", pairs(50, "c"))
    both = order(build(cfg_for([{"path": str(a)}, {"path": str(c)}]), tok)[0])
    assert {k: sorted(x for x in v if x[0] == "a") for k, v in both.items()} == {k: sorted(v) for k, v in
                                                                                 first.items()}


def test_blend_helpers():
    from rlhf_tasks.data.blend import eval_size, split_sizes, weighted_sizes

    assert split_sizes(10, [2, 4, 4]) == [2, 4, 4] and sum(split_sizes(101, [2, 4, 4])) == 101
    assert split_sizes(7, [1, 0, 0]) == [7, 0, 0]
    assert eval_size(100, 0.1) == 10 and eval_size(5, 0.1) == 1 and eval_size(1, 0.5) == 0 and eval_size(9, 0) == 0
    assert weighted_sizes([200, 400], [1, 3]) == [133, 400]
    assert weighted_sizes([100, 100, 100], [1, 1, 2]) == [50, 50, 100]


# ---- formatting ------------------------------------------------------------------------------------------
def test_formatting_plain_and_chat_template(tok):
    from rlhf_tasks.data.formatting import (format_conversation, format_prompt, parse_transcript,
                                            tokenize_example, tokenize_responses)

    assert format_prompt(tok, "Describe the cat.") == " Human: Describe the cat. Assistant:"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "more"}]
    assert format_conversation(tok, turns) == " Human: hi Assistant: hello Human: more Assistant:"
    assert parse_transcript("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert parse_transcript("What is Human: x?") is None
    ids = tokenize_responses(tok, ["the cat is warm and calm and bright"], max_len=4)[0]
    assert len(ids) == 4 and ids[-1] == tok.eos_token_id  # truncation keeps the EOS
    ex = tokenize_example(tok, "Describe the cat.", "the cat is warm")
    text = tok.decode(ex["prompt_ids"] + ex["response_ids"])
    assert text == " Human: Describe the cat. Assistant: the cat is warm<eos>"

    ctok = copy.deepcopy(tok)  # the same tokenizer with a chat template
    ctok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert format_prompt(ctok, "Describe the cat.") == "<|user|>Describe the cat.<eos><|assistant|>"
    assert format_prompt(ctok, HH_PROMPT).count("<|user|>") == 2
    ok = tok("ok", add_special_tokens=False)["input_ids"]  # no space after a chat template's generation prompt
    assert tokenize_responses(ctok, ["ok"], 8)[0] == ok + [tok.eos_token_id]


# ---- the demo task ---------------------------------------------------------------------------------------
def test_demo_data_is_shipped_in_sync_and_well_formed(tok):
    from rlhf_tasks.data import demo

    shipped = [json.loads(x) for x in demo.DATA_FILE.read_text().splitlines()]
    assert shipped == demo.generate()  # regenerate with scripts/make_demo_data.py after changing demo.py
    assert demo.DATA_FILE.stat().st_size < 2_000_000 and len(shipped) <= 5000
    st = demo.stats(shipped)
    assert st["margin_min"] >= demo.MIN_MARGIN and st["gold_chosen_mean"] > st["gold_rejected_mean"] + 1
    assert 0.8 < st["gold_chosen_mean"] < 1.4 and st["chosen_at_top"] < 0.4  # SFT demos are a mix, not the top
    assert all(r["gold"] == "demo" for r in shipped)
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in shipped}) == len(shipped)
    short = sum(len(r["rejected"].split()) < demo.MIN_WORDS for r in shipped) / len(shipped)
    assert short > 0.15  # the RM sees that ending early is bad
    for w in demo.VOCAB:  # every demo word is one or two tokens for the tiny tokenizer
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) <= 2, w


def test_demo_gold_score():
    from rlhf_tasks.data.demo import GOLD_RANGE, gold_score
    from rlhf_tasks.data.gold import get_gold_scorer

    p = "Describe the cat."
    assert get_gold_scorer("demo") is gold_score
    assert gold_score(p, "") == GOLD_RANGE[0]  # stopping at once is the worst answer
    best = gold_score(p, "the cat is warm and calm and bright")
    assert best == 1.8
    assert gold_score(p, "the dog is warm and calm and bright") < best  # off topic
    assert gold_score(p, "it is warm and calm and bright") < best  # topic not named
    assert gold_score(p, "the cat is okay") < gold_score(p, "the cat is nice")
    assert gold_score(p, "the cat is dull and dirty") < 0
    assert gold_score(p, "great great great great great great") < 0  # spamming a word does not pay
    assert gold_score(p, " ".join(["the cat is warm and calm"] * 4)) < best  # neither does rambling
    assert gold_score(p, "xqz blorp frob the cat") < gold_score(p, "it is the cat")
    with pytest.raises(ConfigError, match="unknown gold scorer"):
        get_gold_scorer("nope")


# ---- the constraints task (real models) -----------------------------------------------------------------
def test_constraints_data_is_shipped_in_sync_and_leaves_a_gap():
    from rlhf_tasks.config import SourceConfig
    from rlhf_tasks.data import constraints
    from rlhf_tasks.data.sources import resolve_source

    shipped = [json.loads(x) for x in constraints.DATA_FILE.read_text().splitlines()]
    assert shipped == constraints.generate()  # regenerate: scripts/make_demo_data.py --task constraints
    assert constraints.DATA_FILE.stat().st_size < 2_000_000 and len(shipped) <= 5000
    st = constraints.stats(shipped)
    assert st["margin_min"] >= 0.25 and st["gold_chosen_mean"] > st["gold_rejected_mean"] + 0.3
    assert 0.6 < st["gold_chosen_mean"] < 0.8 and st["chosen_at_top"] < 0.2  # SFT demos are a mix, not the top
    # the modal demonstration breaks the lowercase and question rules: greedy SFT cannot reach the top
    assert st["chosen_lowercase"] < 0.5 and st["chosen_question"] < 0.5 and st["chosen_keyword"] > 0.9
    assert all(r["gold"] == "constraints" for r in shipped)
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in shipped}) == len(shipped)
    assert not any(constraints.is_degenerate(r["chosen"]) for r in shipped)
    short = sum(len(constraints.words(r["rejected"])) < constraints.MIN_WORDS for r in shipped) / len(shipped)
    assert short > 0.1  # the RM sees that a fragment breaks the length rule too (not only rambling)
    r = resolve_source(SourceConfig(path="constraints"))
    assert (r.name, r.kind, r.files["train"]) == ("constraints", "demo", [constraints.DATA_FILE])


def test_constraints_gold_score_counts_the_prompts_rules():
    from rlhf_tasks.data.constraints import gold_score, prompt_rules, rules_met
    from rlhf_tasks.data.gold import get_gold_scorer

    p = ('Write one sentence about the ocean. Rules: use the word "waves"; use 4 to 8 words; write only in '
         'lowercase; end with a question mark.')
    assert get_gold_scorer("constraints") is gold_score
    assert prompt_rules(p) == ("waves", 4, 8)
    assert gold_score(p, "do you love the waves of the ocean?") == 1.0
    assert rules_met(p, "Do you love the waves of the ocean?") == {"keyword": True, "length": True,
                                                                    "lowercase": False, "question": True}
    assert gold_score(p, "do you love the salt of the ocean?") == 0.75  # wrong word
    assert gold_score(p, "do you love the WAVES of the ocean.") == 0.5  # keyword in any case; capitals; no "?"
    assert gold_score(p, "do you love the waves of the ocean when the sun goes down?") == 0.75  # 12 words
    assert gold_score(p, "waves?") == 0.75  # too short
    assert gold_score(p, "") == 0.0  # stopping at once meets no rule (lowercase needs letters)
    assert gold_score(p, "waves waves waves waves?") == 0.0  # degenerate: 1 distinct word of 4
    assert gold_score(p, "the waves and the salt and the sand of the ocean") > 0  # a few "the"s are fine
    with pytest.raises(ValueError, match="not a constraints-task prompt"):
        prompt_rules("Describe the cat.")


# ---- fingerprints ----------------------------------------------------------------------------------------
def test_fingerprints(tmp_path):
    from rlhf_tasks.config import SourceConfig
    from rlhf_tasks.data.sources import fingerprint_source

    demo_fp = fingerprint_source(SourceConfig(path="demo"))
    assert demo_fp["kind"] == "demo" and demo_fp == fingerprint_source(SourceConfig(path="demo"))
    sha = "0123456789abcdef0123456789abcdef01234567"  # pinned: used as given (moving refs: test_stage_keys.py)
    hub = fingerprint_source(SourceConfig(path="Dahoas/rm-static", revision=sha))
    assert hub == {"kind": "hub", "name": "Dahoas/rm-static", "revision": sha}
    d = tmp_path / "f"
    d.mkdir()
    write_jsonl(d / "train.jsonl", pairs(3))
    first = fingerprint_source(SourceConfig(path=str(d)))
    write_jsonl(d / "train.jsonl", pairs(3, "x"))
    assert fingerprint_source(SourceConfig(path=str(d))) != first
    with pytest.raises(ConfigError, match="no such file"):
        fingerprint_source(SourceConfig(path=str(tmp_path / "missing.jsonl")))


def test_relative_source_path_survives_a_change_of_folder(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "rel.jsonl", pairs(30))
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for([{"path": "rel.jsonl"}])  # stage jobs run in their own folder: the path is made absolute
    assert cfg.data.sources[0].path == str((tmp_path / "rel.jsonl").resolve())
    monkeypatch.chdir("/")
    assert build(cfg, tok)[2]["rows.total"] == 30
