"""Sampling against `transformers`' logits processors, seeds, stop strings, streaming text, and bad values."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import sentences
from ember.data.tokenizer import train_tokenizer
from ember.errors import EmberError
from ember.model import ModelConfig, SamplingParams, TextStream, Transformer, generate_ids
from ember.model.generate import StopStrings
from ember.model.sampling import draw, process_logits


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.3, temperature=0.7, top_k=20, top_p=0.9),
    dict(repetition_penalty=0.8, temperature=1.5, top_k=0, top_p=0.5),
    dict(repetition_penalty=1.0, temperature=1.0, top_k=5, top_p=1.0),
])
def test_logits_processing_equals_transformers(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 3
    history = torch.randint(0, 300, (4, 25), generator=g)
    processors = LogitsProcessorList()
    if kw["repetition_penalty"] != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    processors.append(TemperatureLogitsWarper(kw["temperature"]))
    if kw["top_k"]:
        processors.append(TopKLogitsWarper(kw["top_k"]))
    if kw["top_p"] < 1.0:
        processors.append(TopPLogitsWarper(kw["top_p"]))
    expected = processors(history, logits.clone())
    got = process_logits(logits.clone(), SamplingParams(**kw), history)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    assert torch.allclose(got[finite], expected[finite], atol=1e-6)


def test_draw_follows_the_distribution_and_never_takes_a_token_of_probability_zero():
    """Inverse-CDF sampling (one uniform per row): frequencies match the probabilities, zeros are never drawn, not
    even when the uniform's product rounds up to the row's total, and an unusable row gets -1."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).expand(20000, -1)
    tokens = draw(probs, torch.rand(len(probs), generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    freq = torch.bincount(tokens, minlength=5) / len(tokens)
    assert freq[1] == freq[4] == 0 and torch.allclose(freq, probs[0], atol=0.015)  # 4 standard deviations
    assert draw(torch.tensor([[0.2, 0.8, 0.0]]), torch.tensor([1 - 2 ** -53], dtype=torch.float64)).tolist() == [1]
    unusable = torch.tensor([[float("nan"), 0.5], [0.0, 0.0], [0.25, 0.75]])
    assert draw(unusable, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)).tolist() == [-1, -1, 1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = train_tokenizer(sentences(300), vocab_size=300)
    model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64)).eval()
    return model, tok


def test_same_seed_same_output_and_greedy_equals_top_k_1(tiny):
    model, _ = tiny
    prompt = [[5, 9, 11]]
    sampled = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
    assert generate_ids(model, prompt, sampled) == generate_ids(model, prompt, sampled)
    assert generate_ids(model, prompt, sampled) != generate_ids(model, prompt, SamplingParams(
        max_new_tokens=20, temperature=1.0, seed=8))
    greedy = generate_ids(model, prompt, SamplingParams(max_new_tokens=20, temperature=0))
    assert generate_ids(model, prompt, SamplingParams(max_new_tokens=20, top_k=1, seed=3)) == greedy


def test_stop_tokens_end_a_sequence_and_are_not_emitted(tiny):
    model, _ = tiny
    greedy = generate_ids(model, [[5, 9, 11]], SamplingParams(max_new_tokens=20, temperature=0))[0]
    stop_at = greedy[6]
    first = greedy.index(stop_at)
    assert generate_ids(model, [[5, 9, 11]], SamplingParams(max_new_tokens=20, temperature=0),
                        stop_ids={stop_at})[0] == greedy[:first]
    assert generate_ids(model, [[5, 9, 11]], SamplingParams(max_new_tokens=20, temperature=0,
                                                            stop_token_ids=(stop_at,)))[0] == greedy[:first]


def test_stop_strings_hold_back_only_a_possible_prefix():
    stops = StopStrings(("</end>", "STOP"))
    assert stops.feed("hello </e") == ("hello ", False)
    assert stops.feed("xtra") == ("</extra", False)
    assert stops.feed(" S") == (" ", False)
    assert stops.feed("TOP and more") == ("", True)
    assert StopStrings(("ab",)).feed("xxaab") == ("xxa", True)


def test_text_stream_streams_and_stops_at_a_stop_string(tiny):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=30, temperature=0)
    stream = TextStream(model, tok, "the model reads", params, set())
    chunks = list(stream)
    full = stream.completion.text
    assert "".join(chunks) == full == tok.decode(stream.completion.token_ids)
    assert chunks and stream.completion.finish_reason == "length"
    assert len(stream.completion.token_ids) == 30
    assert stream.completion.prompt_tokens == len(tok.encode("the model reads").ids)
    cut = full[len(full) // 2: len(full) // 2 + 3]
    stopped = TextStream(model, tok, "the model reads", SamplingParams(max_new_tokens=30, temperature=0, stop=(cut,)),
                         set())
    text = "".join(stopped)
    assert text == full[: full.index(cut)] and stopped.completion.finish_reason == "stop"


def test_bad_prompts_and_sampling_values_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(EmberError, match="empty prompt"):
        TextStream(model, tok, "", SamplingParams(), set())
    with pytest.raises(EmberError, match=r"the prompt has \d+ tokens; the model's context is 64 tokens"):
        TextStream(model, tok, "the model reads " * 40, SamplingParams(), set())
    for field, value in [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("max_new_tokens", 0),
                         ("repetition_penalty", 0), ("repetition_penalty", 5e-324), ("stop", ("",)),
                         ("temperature", float("nan"))]:
        with pytest.raises(EmberError, match=f"invalid sampling value {field}="):
            SamplingParams(**{field: value}).validate()


def test_generation_stops_at_the_context_limit(tiny):
    model, _ = tiny
    out = generate_ids(model, [list(range(1, 61))], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert len(out) == 4  # 60 prompt tokens + 4 new fill the 64-token context


def test_ember_generate_streams_from_a_model_dir(tmp_path, tiny, capsys):
    from conftest import run_ember
    from ember.cli import _parser, cmd_generate
    from ember.data.tokenizer import save_tokenizer
    from ember.model import save_model

    model, tok = tiny
    save_tokenizer(tok, tmp_path / "tok", model_max_length=64)
    save_model(model, tmp_path / "m", tokenizer_dir=tmp_path / "tok", eos_token_id=0)

    def generate(*args):  # as a user runs it
        return run_ember("generate", tmp_path / "m", *args, timeout=120)

    def generate_here(*args) -> str:  # the same parser and verb, in this process: what it prints
        capsys.readouterr()
        assert cmd_generate(_parser().parse_args(["generate", str(tmp_path / "m"), *args])) == 0
        out = capsys.readouterr()
        assert "tokens/s" in out.err
        return out.out

    greedy = generate("--prompt", "the model reads", "--max-tokens", "12", "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    expected = TextStream(model, tok, "the model reads", SamplingParams(max_new_tokens=12, temperature=0), {0})
    assert greedy.stdout == "".join(expected) + "\n"
    assert "tokens/s" in greedy.stderr
    # Each sampling flag reaches the sampler: the CLI prints what the library gives for the same parameters (the
    # CLI's defaults: temperature 0.8, top_p 0.95), and the flags change the answer.
    plain = "".join(TextStream(model, tok, "the model", SamplingParams(max_new_tokens=10, temperature=0), {0}))
    stop = plain.strip()[3:6]  # a string the greedy answer holds: it must end the answer before it
    flags = [(("--temperature", "0"), {"temperature": 0.0}),
             (("--seed", "4"), {"seed": 4}),
             (("--seed", "4", "--top-p", "0.5"), {"seed": 4, "top_p": 0.5}),
             (("--seed", "4", "--top-k", "3", "--top-p", "1"), {"seed": 4, "top_k": 3, "top_p": 1.0}),
             (("--temperature", "0", "--repetition-penalty", "0.05"), {"temperature": 0.0, "repetition_penalty": 0.05}),
             (("--temperature", "0", "--stop", "zzz", "--stop", stop), {"temperature": 0.0, "stop": ("zzz", stop)})]
    answers = []
    for args, fields in flags:
        done = generate_here("--prompt", "the model", "--max-tokens", "10", *args)
        params = SamplingParams(**{"max_new_tokens": 10, "temperature": 0.8, "top_p": 0.95, **fields})
        assert done == "".join(TextStream(model, tok, "the model", params, {0})) + "\n", args
        answers.append(done)
    assert answers[0] == plain + "\n" and answers[-1] == plain[: plain.index(stop)] + "\n"
    assert generate_here("--prompt", "the model", "--max-tokens", "10", "--seed", "4") == answers[1]  # repeatable
    assert len(set(answers)) == len(answers), answers  # every flag changed the answer
    bad = generate("--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: invalid sampling value temperature=-1.0: " \
                                                         "expected a number >= 0"
    with pytest.raises(EmberError, match="the model's context is 64 tokens"):
        generate_here("--prompt", "the model reads " * 40)
    missing = run_ember("generate", tmp_path / "nope", "--prompt", "x", timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: model directory not found: {tmp_path / 'nope'}"
