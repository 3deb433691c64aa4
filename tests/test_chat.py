"""Conversations for fine-tuning without Ray: record formats, bad records, the chat template (checked against
`transformers`), the loss mask, and packing that keeps conversations apart."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from ember.data.chat import (
    BadRecord,
    ChatEncoder,
    ChatTemplate,
    SFTPacker,
    chat_tokenizer,
    special_token_vars,
    template_source,
    to_messages,
)
from ember.data.tokenizer import DEFAULT_CHAT_TEMPLATE, save_tokenizer, tokenizer_config, train_tokenizer
from ember.train.recipes import masked_cross_entropy, supervised_loss

QA = [("What color is the fox?", "The fox is red."), ("What color is the crow?", "The crow is black."),
      ("Where does the whale live?", "The whale lives in the sea.")]


@pytest.fixture(scope="module")
def tok():
    text = [f"{q} {a}" for q, a in QA] * 40 + ["system user assistant helpful answer briefly"] * 10
    return train_tokenizer(text, 300)


@pytest.fixture(scope="module")
def encoder(tok):
    return ChatEncoder(tok, ChatTemplate(DEFAULT_CHAT_TEMPLATE))


def conversation(i: int, system: bool = False) -> list[dict]:
    q, a = QA[i % len(QA)]
    head = [{"role": "system", "content": "Answer briefly."}] if system else []
    return head + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_the_three_record_formats_give_the_same_conversation():
    want = [{"role": "user", "content": "What color is the fox?"}, {"role": "assistant", "content": "Red."}]
    assert to_messages({"messages": want}) == want
    assert to_messages({"prompt": "What color is the fox?", "response": "Red."}) == want
    assert to_messages({"instruction": "What color is the fox?", "output": "Red."}) == want
    alpaca = to_messages({"instruction": "Name its color.", "input": "the fox", "output": "Red."})
    assert alpaca[0]["content"] == "Name its color.\n\nthe fox"


def test_sharegpt_conversations_and_a_named_messages_field_give_the_same_conversation():
    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the fox?"},
            {"role": "assistant", "content": "Red."}]
    sharegpt = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What color is the fox?"},
                {"from": "gpt", "value": "Red."}]
    assert to_messages({"conversations": sharegpt, "id": 7}) == want
    assert to_messages({"conversations": want}) == want
    assert to_messages({"dialog": sharegpt}, messages_field="dialog") == want
    assert to_messages({"dialog": want, "messages": []}, "messages", messages_field="dialog") == want


@pytest.mark.parametrize("record, reason, words", [
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown_role",
     "unknown role 'wizard'"),
    ({"messages": []}, "empty_conversation", "empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn", "no assistant turn"),
    ({"prompt": "hi"}, "missing_field", "missing field 'response'"),
    ({"messages": [{"role": "user"}]}, "missing_field", "needs 'role' and 'content'"),
    ({"messages": "hello"}, "wrong_type", "expected a list"),
    ({"prompt": "hi", "response": 3}, "wrong_type", "'response' is int"),
    ({"question": "hi"}, "missing_field", "has: question"),
    (["not", "an", "object"], "not_an_object", "expected a JSON object"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "x"}]}, "unknown_role",
     "conversations[1] has unknown role 'function_call' (one of: human, gpt, system"),
    ({"conversations": [{"from": "gpt", "value": None}]}, "wrong_type", "conversations[0].value is NoneType"),
    ({"conversations": [{"from": "gpt"}]}, "missing_field", "(or ShareGPT's 'from' and 'value')"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "x"}]},
     "lone_surrogate", "messages[0].content holds a lone surrogate"),
    ({"prompt": "hi", "response": "\udfff"}, "lone_surrogate", "field 'response' holds a lone surrogate"),
])
def test_bad_records_name_what_is_wrong(record, reason, words):
    with pytest.raises(BadRecord) as caught:
        to_messages(record)
    assert caught.value.reason == reason and words in caught.value.detail


def test_the_template_renders_as_transformers_renders_it(tok, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tok, tmp_path, model_max_length=64)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = conversation(0, system=True) + conversation(1)
    ours = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    for prompt in (False, True):
        assert ours.render(messages, prompt) == hf.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=prompt)
    # A template with the features real ones use (raise_exception, special-token variables, loop controls).
    llama_like = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                  "{% endif %}[{{ m['role'] }}] {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[assistant] {% endif %}")
    hf.chat_template = llama_like
    config = {"bos_token": "<|pad|>", "eos_token": "<|endoftext|>"}
    assert ChatTemplate(llama_like, special_token_vars(config)).render(messages, True) == \
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, bos_token="<|pad|>")


def test_the_loss_mask_covers_assistant_turns_and_their_end_marker(tok, encoder):
    messages = conversation(0, system=True) + conversation(2)
    ids, mask = encoder.encode(messages)
    targets = tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert targets == "The fox is red.<|im_end|>\nThe whale lives in the sea.<|im_end|>\n"
    _, everything = ChatEncoder(tok, ChatTemplate(DEFAULT_CHAT_TEMPLATE), train_on="all").encode(messages)
    assert everything[1:].all() and everything[0] == 0


def test_a_prompt_tokens_label_cannot_change_the_loss_and_an_assistant_tokens_can(encoder):
    model = tiny_model(300).requires_grad_(False)
    ids, mask = encoder.encode(conversation(1, system=True))
    batch = {"input_ids": torch.from_numpy(ids)[None], "loss_mask": torch.from_numpy(mask.astype(np.int64))[None],
             "segments": torch.ones(1, len(ids), dtype=torch.long)}
    loss = float(supervised_loss(model, batch))
    logits = model(batch["input_ids"][:, :-1])
    labels, label_mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
    assert abs(float(masked_cross_entropy(logits, labels, label_mask)) - loss) < 1e-6  # what training minimises
    for position in np.flatnonzero(mask[1:] == 0):  # every prompt (and template) token's label
        changed = labels.clone()
        changed[0, position] = (changed[0, position] + 7) % 300
        assert float(masked_cross_entropy(logits, changed, label_mask)) == pytest.approx(loss, abs=1e-6)
    for position in np.flatnonzero(mask[1:] == 1):  # every assistant token's label
        changed = labels.clone()
        changed[0, position] = (changed[0, position] + 7) % 300
        assert abs(float(masked_cross_entropy(logits, changed, label_mask)) - loss) > 1e-4


def test_packed_conversations_never_see_or_score_each_other(encoder):
    model = tiny_model(300)
    convs = [encoder.encode(conversation(i, system=i == 1)) for i in range(3)]
    row_len = sum(len(ids) for ids, _ in convs) + 5
    packer = SFTPacker(row_len, pad_id=1)
    for ids, mask in convs:
        packer.add(ids, mask)
    packer.finish()
    rows = packer.take()
    assert rows["input_ids"].shape == (1, row_len)
    seg = rows["segments"][0]
    assert list(np.unique(seg)) == [0, 1, 2, 3] and (seg[-5:] == 0).all() and not rows["loss_mask"][0, -5:].any()
    at = 0
    packed_logits = model(torch.from_numpy(rows["input_ids"][:, :-1]), segments=torch.from_numpy(
        rows["segments"][:, :-1].astype(np.int64)))[0]
    for n, (ids, mask) in enumerate(convs, 1):
        span = slice(at, at + len(ids))
        assert (seg[span] == n).all() and (rows["loss_mask"][0, span] == mask).all()  # its own mask, nobody else's
        alone = model(torch.from_numpy(ids[None, :-1]))[0]
        assert torch.allclose(packed_logits[at: at + len(ids) - 1], alone, atol=1e-5)  # it attends to itself only
        at += len(ids)
    # Without segments the later conversations would read the earlier ones:
    mixed = model(torch.from_numpy(rows["input_ids"][:, :-1]))[0]
    second = slice(len(convs[0][0]), len(convs[0][0]) + len(convs[1][0]) - 1)
    assert not torch.allclose(mixed[second], packed_logits[second], atol=1e-3)


def test_a_packer_without_packing_gives_one_conversation_per_row(encoder):
    convs = [encoder.encode(conversation(i)) for i in range(3)]
    packer = SFTPacker(64, pad_id=1, pack=False)
    for ids, mask in convs:
        packer.add(ids, mask)
    packer.finish()
    assert packer.take()["segments"].max(axis=1).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="does not fit a row of 64"):
        packer.add(np.zeros(65, dtype=np.int64), np.zeros(65, dtype=np.uint8))


def test_a_tokenizer_without_chat_tokens_gets_them_added(tmp_path):
    tok = train_tokenizer([f"{q} {a}" for q, a in QA] * 20, 300)
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.add_tokens(["hello"])
    grown, config, added = chat_tokenizer(plain, {"eos_token": "hello"})
    assert added == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert grown.token_to_id("<|im_end|>") == 2 and template_source(config) == DEFAULT_CHAT_TEMPLATE
    same, config, added = chat_tokenizer(tok, {"chat_template": "{{ messages[0]['content'] }}"})
    assert added == [] and template_source(config) == "{{ messages[0]['content'] }}"


def test_conversations_are_read_from_parquet_and_jsonl_with_their_locations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ember.config.specs import SourceSpec
    from ember.data.sources import RecordReader, SkipLog, plan_units, resolve_inputs

    pq.write_table(pa.table({
        "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                     [{"role": "user", "content": "alone"}]],
    }), tmp_path / "chat.parquet")
    pq.write_table(pa.table({"instruction": ["Name a color."], "input": [""], "output": ["Red."]}),
                   tmp_path / "alpaca.parquet")
    (tmp_path / "qa.jsonl").write_text('{"prompt": "a?", "response": "b."}\n\n{"prompt": 1, "response": "x"}\n')
    source = SourceSpec(inputs=[str(tmp_path)])
    found, bad = [], []
    for unit in plan_units(resolve_inputs(source), source):
        for record, where in RecordReader(source, SkipLog())(unit):
            try:
                found.append((to_messages(record), str(where)))
            except BadRecord as exc:
                bad.append((exc.reason, str(where)))
    assert [m[-1]["content"] for m, _ in found] == ["Red.", "hello", "b."]
    assert [w.rsplit("/", 1)[-1] for _, w in found] == ["alpaca.parquet:row 0", "chat.parquet:row 0", "qa.jsonl:1"]
    assert [(r, w.rsplit("/", 1)[-1]) for r, w in bad] == [("no_assistant_turn", "chat.parquet:row 1"),
                                                           ("wrong_type", "qa.jsonl:3")]


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_conversations_longer_than_a_row_are_cut_or_dropped_and_counted(tmp_path, tok, overlong):
    from pathlib import Path

    from ember.config.specs import ChatDataSpec
    from ember.data.sft import ConversationEncoder
    from ember.data.sources import plan_units, resolve_inputs
    from ember.data.units import UnitJob, UnitRunner, marker_path

    save_tokenizer(tok, tmp_path / "ds", model_max_length=64)
    for split in ("train", "val"):
        (tmp_path / "ds" / split).mkdir()
    long_answer = " ".join(a for _, a in QA) * 4
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What color is the fox?", "response": "The fox is red."},
        {"prompt": "What color is the crow?", "response": long_answer}]))
    data = ChatDataSpec(inputs=[str(tmp_path / "c.jsonl")], seq_len=31, overlong=overlong, val_fraction=0.0)
    unit = plan_units(resolve_inputs(data.source()), data.source())[0]
    job = UnitJob(str(tmp_path / "ds"), 32, "uint16", data.shard_bytes,
                  partial(ConversationEncoder, data, str(tmp_path / "ds")), {unit.index: "input"},
                  extra_columns=("loss_mask", "segments"))
    UnitRunner(job)(unit)  # the executor's worker, without Ray: writes the unit's shards and its marker
    result = json.loads(Path(marker_path(str(tmp_path / "ds"), unit.index)).read_text())
    kept = result["stats"]["train"]["conversations"]
    if overlong == "drop":
        assert kept == 1 and result["skips"]["skipped"] == {"too_long": 1} and result["truncated"] == 0
    else:
        assert kept == 2 and result["truncated"] == 1 and not result["skips"]["skipped"]
    shard = result["shards"]["train"][0]
    assert shard["rows"] == kept and shard["tokens"] == kept * 32  # one row each: neither fits beside the other


TEMPLATES = Path(__file__).parent / "templates"
# Each family's template (tests/templates, as the models ship them), its special tokens, and the target text the
# loss mask of `TURNS` covers: each assistant turn as the template writes it, with its end marker.
FAMILY_TEMPLATES = {
    "qwen2.5": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_start|>"],
                "Red.<|im_end|>\nIn the sea.<|im_end|>\n"),
    "qwen3": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_start|>", "<think>", "</think>"],
              "Red.<|im_end|>In the sea.<|im_end|>"),
    "mistral-instruct": ({"bos_token": "<s>", "eos_token": "</s>"}, ["[INST]", "[/INST]"],
                         " Red.</s> In the sea.</s>"),
    "mistral-nemo": ({"bos_token": "<s>", "eos_token": "</s>"}, ["[INST]", "[/INST]"], "Red.</s>In the sea.</s>"),
}
TURNS = [{"role": "user", "content": "What color is the fox?"}, {"role": "assistant", "content": "Red."},
         {"role": "user", "content": "Where does the whale live?"}, {"role": "assistant", "content": "In the sea."}]
SYSTEM = {"role": "system", "content": "Answer briefly."}


def family_tokenizer(name: str, tmp_path):
    """(Ember's tokenizer, its tokenizer_config.json, transformers' tokenizer of the same dir) with the family's
    template and special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokens, extra, _ = FAMILY_TEMPLATES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [m["content"] for m in TURNS + [SYSTEM]] * 20 + ["You are Qwen, created by Alibaba Cloud."] * 5
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel
                                                      .alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*tokens.values(), *extra]])
    source = (TEMPLATES / f"{name}.jinja").read_text()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    hf.chat_template = source
    hf.save_pretrained(str(tmp_path))
    assert (tmp_path / "chat_template.jinja").read_text() == source  # where transformers writes it now
    config = tokenizer_config(tmp_path)
    return tok, config, hf


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_each_family_s_template_renders_as_transformers_renders_it(name, tmp_path):
    _, config, hf = family_tokenizer(name, tmp_path)
    ours = ChatTemplate.of(config)
    cases = [([SYSTEM, *TURNS], {}), ([SYSTEM, *TURNS[:3]], {}), (TURNS, {})]  # Qwen2.5: its default system prompt
    if name == "qwen3":
        thinking = [*TURNS[:1], {"role": "assistant", "content": "<think>\nfoxes\n</think>\n\nRed."}, *TURNS[2:3]]
        cases += [([SYSTEM, *TURNS[:3]], {"enable_thinking": False}), (thinking, {}), (thinking + TURNS[3:], {})]
    for messages, switches in cases:
        for prompt in (False, True):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **switches)
            assert ours.render(messages, prompt, **switches) == expected, (messages, prompt, switches)
    # continue_final_message: the text ends inside the last message (a prefilled answer, with or without the
    # trailing space a template may strip), as transformers cuts it.
    prefilled = [[SYSTEM, *TURNS], [*TURNS[:3], {"role": "assistant", "content": "In the "}], TURNS[:1]]
    for messages in prefilled:
        expected = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert ours.render(messages, continue_final_message=True) == expected, messages
    with pytest.raises(BadRecord, match="cannot both be on"):
        ours.render(TURNS, add_generation_prompt=True, continue_final_message=True)
    if name == "qwen2.5":
        assert ours.render(TURNS).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    if name == "qwen3":
        assert ours.render(TURNS[:1], True, enable_thinking=False).endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_the_loss_mask_covers_exactly_the_assistant_turns_in_each_family_s_template(name, tmp_path):
    """Multi-turn with a system message: Qwen2.5 and Mistral-Instruct render turn by turn as prefixes; Qwen3 (its
    last turn gets a thinking block) and Mistral Nemo (the system message moves to the last user turn) do not, and
    their assistant contents are found in the text instead. Either way the targets are the assistant turns."""
    tok, config, hf = family_tokenizer(name, tmp_path)
    encoder = ChatEncoder(tok, ChatTemplate.of(config))
    ids, mask = encoder.encode([SYSTEM, *TURNS])
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == hf.apply_chat_template([SYSTEM, *TURNS],
                                                                                         tokenize=False)
    assert tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False) == FAMILY_TEMPLATES[name][2]
