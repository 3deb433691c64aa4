"""Qwen2 / Qwen2.5, Qwen3 and Mistral beside Llama: random small models built with `transformers` for each family,
loaded in Ember and written back, against the family's own `transformers` class (logits both ways, greedy tokens,
the KV cache, packed rows, Mistral's sliding window)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ember.model import KVCache, SamplingParams, generate_ids, load_model, num_parameters, save_model
from ember.model.hf import config_from_hf

VOCAB = 101
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=160, rms_norm_eps=1e-6, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
FAMILIES = {
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**SHAPE, tie_word_embeddings=True,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-untied": (Qwen2ForCausalLM, Qwen2Config(**SHAPE, tie_word_embeddings=False)),
    "qwen3-tied": (Qwen3ForCausalLM, Qwen3Config(**SHAPE, head_dim=24, tie_word_embeddings=True,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-untied": (Qwen3ForCausalLM, Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=False)),
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, head_dim=16, sliding_window=None)),
    "mistral-window": (MistralForCausalLM, MistralConfig(**SHAPE, head_dim=16, sliding_window=12)),
}


def tokens(batch=2, length=40, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def family_model(name: str, seed: int = 0):
    """A family's `transformers` model with every tensor random, biases and q/k norms included (their
    initialisation would leave them 0 and 1, which a missing bias or norm would pass)."""
    cls, config = FAMILIES[name]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1 if pname.endswith("bias") else 0.05)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(name, the transformers model, Ember's load of its saved dir, that dir)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = family_model(request.param)
    hf.save_pretrained(directory)
    return request.param, hf, load_model(directory), directory


def test_the_family_loads_with_its_differences_as_config_data(pair):
    name, hf, ours, directory = pair
    cfg = ours.config
    assert cfg.model_type == hf.config.model_type
    assert cfg.qkv_bias == name.startswith("qwen2") and cfg.qk_norm == name.startswith("qwen3")
    assert cfg.sliding_window == (12 if name == "mistral-window" else None)
    assert cfg.head_dim == (getattr(hf.config, "head_dim", None) or 64 // 4)
    assert num_parameters(cfg) == sum(p.numel() for p in hf.parameters())


def test_logits_equal_the_family_in_transformers(pair):
    name, hf, ours, _ = pair
    x = tokens()  # 40 positions: past Mistral's 12-position window
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4, rtol=0), name


def test_greedy_tokens_equal_transformers_generate(pair):
    name, hf, ours, _ = pair
    prompt = tokens(1, 7, seed=5)
    expected = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate_ids(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert got == expected[0, 7:].tolist(), name


def test_the_cache_equals_a_full_forward_and_packed_rows_equal_separate_sequences(pair):
    name, _, ours, _ = pair
    x = tokens(1, 40, seed=7)
    with torch.no_grad():
        full = ours(x)[0]
        cache = KVCache(ours.config, 1, 48)
        steps = [ours(x[:, :9], cache=cache)[0]] + [ours(x[:, t:t + 1], cache=cache)[0] for t in range(9, 40)]
        assert torch.allclose(torch.cat(steps), full, atol=1e-5, rtol=0), name
        two = torch.cat([x, tokens(1, 40, seed=8)])  # two rows: the second one packed differently
        segments = torch.tensor([[0] * 25 + [1] * 15, [0] * 10 + [1] * 30])
        packed = ours(two, segments=segments)
        for row, cut in ((0, 25), (1, 10)):
            assert torch.allclose(packed[row, :cut], ours(two[row:row + 1, :cut])[0], atol=1e-5, rtol=0), name
            assert torch.allclose(packed[row, cut:], ours(two[row:row + 1, cut:])[0], atol=1e-5, rtol=0), name


def test_ember_writes_the_family_s_own_format(pair, tmp_path):
    name, hf, ours, _ = pair
    save_model(ours, tmp_path / "out", eos_token_id=[1, 2])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type and config["architectures"] == hf.config.architectures
    assert not {"qkv_bias", "qk_norm"} & set(config)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    assert config_from_hf(config) == ours.config
    x = tokens(seed=9)
    with torch.no_grad():
        assert torch.allclose(back(x).logits, ours(x), atol=1e-4, rtol=0), name
        assert torch.allclose(back(x).logits, hf(x).logits, atol=1e-4, rtol=0), name


def test_mistral_s_window_applies_beyond_it_and_not_before(tmp_path):
    """Ember's Mistral with a 12-position window, against transformers' with and without it: the first 12 positions
    equal both, the later ones equal only the windowed model (so the window was applied, and applied as there),
    through either attention kernel."""
    hf = family_model("mistral-window", seed=3)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    cls, config = FAMILIES["mistral"]
    unwindowed = cls(config).eval()
    unwindowed.load_state_dict(hf.state_dict())
    x = tokens(1, 40, seed=11)
    with torch.no_grad():
        windowed, full = hf(x).logits[0], unwindowed(x).logits[0]
        for kernel in ("sdpa", "flex"):
            ours.attention = kernel
            got = ours(x)[0]
            assert torch.allclose(got, windowed, atol=1e-4, rtol=0), kernel
            assert torch.allclose(got[:12], full[:12], atol=1e-4, rtol=0), kernel
            assert (got[12:] - full[12:]).abs().max() > 1e-2, kernel
