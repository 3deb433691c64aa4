"""Preference pairs: records → two conversations sharing a prompt → ids with the answer alone masked; bad pairs named
by file:line; the built-in python-prefs set; and one preference dataset written on the suite's Ray instance and
reused on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ember.config.specs import PairDataSpec, SourceSpec
from ember.data import builtin, shards
from ember.data.chat import BadRecord, ChatEncoder, ChatTemplate, chat_tokenizer
from ember.data.pairs import PairEncoder, encode_pair, read_pairs, to_pair
from ember.data.sources import RecordReader, SkipLog, plan_units, resolve_inputs
from ember.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_config, train_tokenizer
from ember.errors import EmberError

QA = [("What color is the fox?", "The fox is red.", "The fox is black."),
      ("What color is the crow?", "The crow is black.", "The crow is red."),
      ("Where does the whale live?", "The whale lives in the sea.", "The whale lives near the shore.")]


def text_pair(i: int) -> dict:
    prompt, chosen, rejected = QA[i % len(QA)]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def conversation_pair(i: int) -> dict:
    p = text_pair(i)
    turns = [{"role": "user", "content": p["prompt"]}]
    return {"chosen": turns + [{"role": "assistant", "content": p["chosen"]}],
            "rejected": turns + [{"role": "assistant", "content": p["rejected"]}]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A base model's tokenizer (no chat template of its own: the pairs get Ember's ChatML one)."""
    text = [" ".join(q) for q in QA] * 40 + ["system user assistant answer briefly the sea shore"] * 10
    base = tmp_path_factory.mktemp("base")
    save_tokenizer(train_tokenizer(text, 300), base, model_max_length=128)
    return base


@pytest.fixture(scope="module")
def dataset_dir(base_dir, tmp_path_factory) -> Path:
    """A dataset dir's tokenizer and template, as the preference job writes them before its units run."""
    tok, config, _ = chat_tokenizer(load_tokenizer(base_dir), tokenizer_config(base_dir))
    out = tmp_path_factory.mktemp("pairs-ds")
    save_tokenizer(tok, out, model_max_length=128, base_config=config)
    return out


@pytest.fixture(scope="module")
def encoder(dataset_dir) -> ChatEncoder:
    return ChatEncoder(load_tokenizer(dataset_dir), ChatTemplate.of(tokenizer_config(dataset_dir)))


def decoded(encoder: ChatEncoder, ids: np.ndarray) -> str:
    return encoder.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def test_a_text_pair_and_the_same_conversations_encode_alike_with_only_the_answer_masked(encoder):
    texts = encode_pair(encoder, text_pair(0), "texts")
    for got, want in zip(encode_pair(encoder, conversation_pair(0), "auto"), texts):
        assert np.array_equal(got, want)
    chosen, chosen_mask, rejected, rejected_mask = texts
    assert decoded(encoder, chosen[chosen_mask == 1]) == "The fox is red.<|im_end|>\n"
    assert decoded(encoder, rejected[rejected_mask == 1]) == "The fox is black.<|im_end|>\n"
    start = int(np.argmax(chosen_mask))  # the answer follows the shared prompt on both sides
    assert start == int(np.argmax(rejected_mask)) and np.array_equal(chosen[:start], rejected[:start])
    assert decoded(encoder, chosen[:start]).endswith("What color is the fox?<|im_end|>\n<|im_start|>assistant\n")
    assert chosen_mask[start:].all() and rejected_mask[start:].all()


def test_only_the_final_assistant_turn_of_a_conversation_pair_carries_loss(encoder):
    head = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What color is the fox?"},
            {"role": "assistant", "content": "The fox is red."}, {"role": "user", "content": "And the crow?"}]
    record = {"chosen": head + [{"role": "assistant", "content": "The crow is black."}],
              "rejected": [{"from": m["role"].replace("user", "human"), "value": m["content"]} for m in head]
              + [{"from": "gpt", "value": "The crow is red."}]}  # ShareGPT's form of the same prompt
    chosen, chosen_mask, rejected, rejected_mask = encode_pair(encoder, record)
    assert decoded(encoder, chosen[chosen_mask == 1]) == "The crow is black.<|im_end|>\n"
    assert decoded(encoder, rejected[rejected_mask == 1]) == "The crow is red.<|im_end|>\n"
    assert "The fox is red." in decoded(encoder, chosen[: int(np.argmax(chosen_mask))])  # an earlier turn: prompt


def test_trls_explicit_prompt_layout_is_the_same_pair(encoder):
    """TRL's layout: a prompt (a string, or the turns before the answer) and sides holding only the answer."""
    answer = ([{"role": "assistant", "content": "The fox is red."}],
              [{"role": "assistant", "content": "The fox is black."}])
    as_text = encode_pair(encoder, {"prompt": "What color is the fox?", "chosen": answer[0], "rejected": answer[1]})
    as_turns = encode_pair(encoder, {"prompt": [{"role": "user", "content": "What color is the fox?"}],
                                     "chosen": answer[0], "rejected": answer[1]})
    for a, b, c in zip(as_text, as_turns, encode_pair(encoder, text_pair(0), "texts")):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    with pytest.raises(BadRecord, match="'prompt' is a int"):
        encode_pair(encoder, {"prompt": 3, "chosen": answer[0], "rejected": answer[1]})


def conversations(chosen: list, rejected: list) -> dict:
    def turns(side):
        return [{"role": r, "content": c} for r, c in side]
    return {"chosen": turns(chosen), "rejected": turns(rejected)}


BAD = [  # (record, reason, words in the detail)
    (["not", "a", "pair"], "not_a_pair", "expected a JSON object"),
    ({"prompt": "What color is the fox?", "chosen": "The fox is red."}, "not_a_pair", "missing field 'rejected'"),
    ({"prompt": "What color is the fox?", "chosen": "The fox is red.", "rejected": 3}, "not_a_pair",
     "'rejected' is int"),
    ({"prompt": "What color is the fox?", "chosen": " ", "rejected": "The fox is black."}, "empty_side",
     "chosen answer is empty"),
    ({"prompt": "What color is the fox?", "chosen": "Red.", "rejected": "Red."}, "same_answer", "same text"),
    ({"prompt": "", "chosen": "The fox is red.", "rejected": "The fox is black."}, "no_shared_prompt",
     "prompt is empty"),
    (conversations([("user", "What color is the fox?"), ("assistant", "Red.")],
                   [("user", "What color is the crow?"), ("assistant", "Black.")]), "no_shared_prompt", "turn 0"),
    (conversations([("user", "What color is the fox?"), ("assistant", "Red.")],
                   [("user", "What color is the fox?"), ("assistant", "Black."), ("user", "Sure?")]),
     "last_turn_not_assistant", "last turn of 'rejected'"),
    (conversations([("user", "What color is the fox?")], [("user", "What color is the fox?")]),
     "last_turn_not_assistant", "no assistant turn"),
    (conversations([("critic", "What color is the fox?"), ("assistant", "Red.")],
                   [("critic", "What color is the fox?"), ("assistant", "Black.")]), "unknown_role", "'critic'"),
]


@pytest.mark.parametrize("record, reason, words", BAD)
def test_bad_pairs_name_what_is_wrong(record, reason, words):
    with pytest.raises(BadRecord) as exc:
        to_pair(record)
    assert exc.value.reason == reason and words in exc.value.detail


def pairs_file(path: Path, bad: list[tuple[dict, str]]) -> dict[int, str]:
    """JSONL of good pairs with each of `bad` after two good ones, plus one too long for a row; returns the line of
    each bad record and its reason."""
    lines, where = [], {}
    for i, (record, reason) in enumerate(bad + [({**text_pair(0), "chosen": "The fox is red. " * 40}, "too_long")]):
        lines += [json.dumps(text_pair(2 * i)), json.dumps(conversation_pair(2 * i + 1)), json.dumps(record)]
        where[len(lines)] = reason
    lines += [json.dumps(text_pair(k)) for k in range(6)]
    path.write_text("\n".join(lines) + "\n")
    return where


def one_of_each(bad: list[tuple]) -> list[tuple[dict, str]]:
    """The first bad record of each reason, as (record, reason)."""
    first: dict[str, tuple] = {}
    for record, reason, _ in bad:
        first.setdefault(reason, (record, reason))
    return list(first.values())


ONE_OF_EACH = one_of_each(BAD)


def run_units(data: PairDataSpec, dataset_dir: Path, skips: SkipLog) -> None:
    """The preference job's unit encoder over the whole input, without Ray (the rows it writes dropped)."""
    encode = PairEncoder(data, str(dataset_dir))
    for unit in plan_units(resolve_inputs(data.source()), data.source()):
        encode(unit, skips, lambda split, rows: None)


@pytest.mark.parametrize("reason", [reason for _, reason in ONE_OF_EACH] + ["too_long"])
def test_each_bad_pair_fails_a_strict_job_naming_its_file_and_line(reason, dataset_dir, tmp_path):
    bad = [(r, why) for r, why in ONE_OF_EACH if why == reason]
    line = next(n for n, why in pairs_file(tmp_path / "pairs.jsonl", bad).items() if why == reason)
    data = PairDataSpec(inputs=[str(tmp_path / "pairs.jsonl")], seq_len=63, strict=True)
    with pytest.raises(EmberError, match=rf"pairs\.jsonl:{line}: .*\(data\.strict is on\)"):
        run_units(data, dataset_dir, SkipLog(strict=True, strict_key="data.strict"))


def test_python_prefs_pair_each_question_with_another_answer_of_its_module():
    def prefs(split, parts=range(builtin.num_parts(builtin.PYTHON_PREFS))):
        return [r for p in parts for r in builtin.python_prefs(p, split)]

    train, test = prefs("train"), prefs("test")
    assert len(train) > 2000 and 50 < len(test) < len(train) / 5
    assert all(r["chosen"] != r["rejected"] for r in train + test)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    qa = {r["prompt"]: r["response"] for p in range(builtin.num_parts(builtin.PYTHON_QA))
          for split in builtin.QA_SPLITS for r in builtin.python_qa(p, split)}
    assert all(qa[r["prompt"]] == r["chosen"] for r in train + test)
    assert {r["prompt"] for r in test} <= {p for p in qa if builtin.qa_split(p) == "test"}
    module_of = {name: rel for rel in builtin.stdlib_files() for _, _, name in builtin._questions(rel)}
    held_in = {}  # per source file, the answers of its held-in questions
    for rel in builtin.stdlib_files():
        held_in[rel] = {a for q, a, _ in builtin._questions(rel) if builtin.qa_split(q) == "train"}
    for r in train + test:
        assert r["rejected"] in held_in[module_of[r["where"].removeprefix("builtin:python-prefs:")]]
    held_out = {r["chosen"] for r in test} - {r["chosen"] for r in train}
    assert held_out and not held_out & {r["rejected"] for r in train}  # no held-out answer is trained on
    builtin._entries.cache_clear()
    again = prefs("train", range(2))  # the same when the files are parsed anew
    assert again and again == train[:len(again)]


def test_python_prefs_is_an_input_wherever_python_qa_is(tmp_path):
    source = SourceSpec(inputs=["builtin:python-prefs:test"])
    unit = plan_units(resolve_inputs(source), source)[0]
    record, where = next(iter(RecordReader(source, SkipLog())(unit)))
    assert set(record) == {"prompt", "chosen", "rejected"} and str(where).startswith("builtin:python-prefs:")
    pairs = read_pairs(["builtin:python-prefs:test"], limit=3)
    assert len(pairs) == 3 and pairs[0].chosen[-1]["content"] == record["chosen"]
    assert pairs[0].chosen[:-1] == pairs[0].rejected[:-1] == [{"role": "user", "content": record["prompt"]}]
    with pytest.raises(EmberError, match=r"unknown built-in corpus 'builtin:python-pref'.*builtin:python-prefs:test"):
        resolve_inputs(SourceSpec(inputs=["builtin:python-pref"]))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(EmberError, match="no usable preference pairs"):
        read_pairs([str(tmp_path / "bad.jsonl")])


def test_preference_shards_keep_rejected_ids_in_the_token_dtype():
    schema = shards.shard_schema(9, np.dtype(np.uint32), shards.PREFERENCE_COLUMNS)
    types = {f.name: f.type.value_type for f in schema}
    assert types == {"input_ids": types["rejected_ids"], "loss_mask": types["rejected_mask"],
                     "rejected_ids": types["input_ids"], "rejected_mask": types["loss_mask"]}
    assert str(types["rejected_ids"]) == "uint32" and str(types["rejected_mask"]) == "uint8"


def test_preference_data_on_ray_skips_bad_pairs_with_their_lines_and_is_reused(base_dir, ray_session, tmp_path):
    from ember.data.pairs import prepare_pair_dataset

    where = pairs_file(tmp_path / "pairs.jsonl", ONE_OF_EACH)
    data = PairDataSpec(inputs=[str(tmp_path / "pairs.jsonl")], seq_len=63, val_fraction=0.3)
    out = tmp_path / "data"
    manifest = prepare_pair_dataset(data, base_dir, out, 128)
    good = len((tmp_path / "pairs.jsonl").read_text().splitlines()) - len(where)
    summary, splits = manifest["pairs"], manifest["splits"]
    assert manifest["kind"] == "preference" and summary["read"] == good + len(where) and summary["kept"] == good
    reasons = sorted(where.values())
    assert summary["skipped"] == {r: reasons.count(r) for r in reasons}
    first = sorted(where)[:len(summary["examples"])]
    assert summary["examples"] and [e.split(": ", 1)[0].rsplit("/", 1)[-1] for e in summary["examples"]] == \
        [f"pairs.jsonl:{n}" for n in first]
    assert splits["train"]["pairs"] and splits["val"]["pairs"]
    assert splits["train"]["pairs"] + splits["val"]["pairs"] == good

    tok, template = load_tokenizer(out), ChatTemplate.of(tokenizer_config(out))
    pad = manifest["pad_id"]
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    expected = {json.dumps(to_pair(json.loads(line))) for n, line in enumerate(lines, 1) if n not in where}
    seen, answer_tokens = set(), 0
    for split in shards.SPLITS:
        reader = shards.ShardReader(out, split)
        for i in range(len(reader)):
            row = reader.columns(i)
            assert sorted(row) == ["input_ids", "loss_mask", "rejected_ids", "rejected_mask"]
            sides = []
            for ids, mask in ((row["input_ids"], row["loss_mask"]), (row["rejected_ids"], row["rejected_mask"])):
                text = tok.decode([int(t) for t in ids[ids != pad]], skip_special_tokens=False)
                answer = tok.decode([int(t) for t in ids[mask == 1]], skip_special_tokens=False)
                sides.append((text, answer))
                answer_tokens += int(mask.sum())
            pair = next(p for p in map(json.loads, expected)
                        if template.render(p[0]) == sides[0][0] and template.render(p[1]) == sides[1][0])
            assert [s[1] for s in sides] == [f"{p[-1]['content']}<|im_end|>\n" for p in pair]
            seen.add(json.dumps(pair))
        reader.close()
    assert seen == expected
    assert answer_tokens == sum(splits[s][k] for s in shards.SPLITS for k in ("chosen_tokens", "rejected_tokens"))

    written = {p: p.stat().st_mtime_ns for p in out.glob("*/*.arrow")}
    assert prepare_pair_dataset(data, base_dir, out, 128) == manifest  # the finished dataset, reused as it is
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.arrow")} == written

