"""The model against `transformers`' LlamaForCausalLM: same logits both ways, same greedy tokens, a correct KV cache."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import get_args

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ember.config.specs import LoraSpec
from ember.errors import EmberError
from ember.model import (
    PRESETS,
    KVCache,
    ModelConfig,
    SamplingParams,
    Transformer,
    build_model,
    fused_slices,
    generate_ids,
    load_model,
    num_parameters,
    preset,
    save_model,
)
from ember.model.hf import config_from_hf

CONFIGS = {
    "mha-untied": dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2,
                     tie_word_embeddings=True),
    "mqa-odd-head-dim": dict(hidden_size=48, intermediate_size=72, num_attention_heads=3, num_key_value_heads=1,
                             head_dim=22),
    "llama3-rope": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 32}),
}


def ember_config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=97, num_hidden_layers=3, max_position_embeddings=96, rms_norm_eps=1e-6,
                       **CONFIGS[name])


def hf_config(cfg: ModelConfig) -> LlamaConfig:
    extra = {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}}
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                       max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                       tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=None, eos_token_id=None, **extra)


def tokens(batch=2, length=70, vocab=97, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_model_transformers_saves_loads_in_ember_with_equal_logits(tmp_path, name):
    torch.manual_seed(1)
    hf = LlamaForCausalLM(hf_config(ember_config(name))).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config == ember_config(name)
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_model_ember_saves_loads_in_transformers_with_equal_logits(tmp_path, name):
    torch.manual_seed(2)
    ours = Transformer(ember_config(name)).eval()
    save_model(ours, tmp_path / "m", eos_token_id=0)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert hf.config.head_dim == ours.config.head_dim
    x = tokens(seed=3)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_fused_layout_stacks_the_llama_projections_by_name_and_size(tmp_path, name):
    """`fused_slices`, the one statement of how qkv_proj and gate_up_proj stack Llama's projections, names
    transformers' modules, covers each fused weight row by row, and is how Ember's weights land in transformers."""
    torch.manual_seed(7)
    cfg = ember_config(name)
    ours = Transformer(cfg).eval()
    save_model(ours, tmp_path / "m")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    layout = fused_slices(cfg)
    assert list(layout) == ["self_attn.qkv_proj", "mlp.gate_up_proj"]
    assert [list(rows) for rows in layout.values()] == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]
    for path, rows in layout.items():
        parent = path.split(".")[0]
        fused = ours.layers[1].get_submodule(path).weight
        ends = [0] + [r.stop for r in rows.values()]
        assert [r.start for r in rows.values()] == ends[:-1] and ends[-1] == fused.shape[0], path
        for llama_name, r in rows.items():
            theirs = hf.model.layers[1].get_submodule(f"{parent}.{llama_name}").weight
            assert torch.equal(theirs, fused[r]), llama_name
    # LoRA targets Llama's projection names: the fused blocks and the projections Ember keeps whole.
    layer = ours.layers[0]
    whole = {name for parent in ("self_attn", "mlp") for name, m in layer.get_submodule(parent).named_children()
             if isinstance(m, torch.nn.Linear) and f"{parent}.{name}" not in layout}
    hf_linears = {n.split(".")[-1] for n, m in hf.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert whole | {n for rows in layout.values() for n in rows} == hf_linears
    (targets,) = get_args(LoraSpec.model_fields["target_modules"].annotation)
    assert set(get_args(targets)) == hf_linears


@pytest.mark.parametrize("name", ["gqa-tied", "llama3-rope"])
def test_greedy_generation_matches_transformers_generate(tmp_path, name):
    torch.manual_seed(4)
    hf = LlamaForCausalLM(hf_config(ember_config(name))).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    prompt = tokens(1, 9, seed=5)
    expected = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate_ids(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=40, temperature=0))[0]
    assert got == expected[0, 9:].tolist()


def test_incremental_decoding_with_the_cache_equals_a_full_forward():
    torch.manual_seed(6)
    model = Transformer(ember_config("gqa-tied")).eval()
    x = tokens(1, 40, seed=7)
    with torch.no_grad():
        full = model(x)[0]  # (T, V)
        cache = KVCache(model.config, 1, 64)
        steps = [model(x[:, :13], cache=cache)[0]]
        steps += [model(x[:, t:t + 1], cache=cache)[0] for t in range(13, 40)]
    assert torch.allclose(torch.cat(steps), full, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [40]


def test_one_cache_serves_rows_of_different_lengths():
    torch.manual_seed(8)
    model = Transformer(ember_config("mqa-odd-head-dim")).eval()
    prompts = [tokens(1, n, seed=n)[0] for n in (5, 17, 11)]
    with torch.no_grad():
        cache = KVCache(model.config, 3, 40)
        padded = torch.zeros(3, 17, dtype=torch.long)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = p
        last = model(padded, cache=cache, num_new=torch.tensor([5, 17, 11]), last_only=True)
        nxt = torch.tensor([[3], [4], [5]])
        step = model(nxt, cache=cache, num_new=torch.ones(3, dtype=torch.long), last_only=True)
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, nxt[i]])[None])[0]
            assert torch.allclose(last[i], alone[len(p) - 1], atol=1e-5, rtol=0)
            assert torch.allclose(step[i], alone[len(p)], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [6, 18, 12]


def test_batched_generation_equals_one_prompt_at_a_time():
    torch.manual_seed(9)
    model = Transformer(ember_config("llama3-rope")).eval()
    prompts = [tokens(1, n, seed=20 + n)[0].tolist() for n in (3, 12, 7)]
    params = SamplingParams(max_new_tokens=15, temperature=0)
    batched = generate_ids(model, prompts, params)
    assert batched == [generate_ids(model, [p], params)[0] for p in prompts]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loads_sharded_half_precision_checkpoints_written_by_transformers(tmp_path, dtype):
    torch.manual_seed(10)
    hf = LlamaForCausalLM(hf_config(ember_config("gqa-tied"))).to(dtype)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(tmp_path, dtype=torch.float32)
    x = tokens(seed=11)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x).logits, atol=1e-4, rtol=0)


def test_ember_writes_shards_with_an_index_above_the_size_limit(tmp_path):
    model = Transformer(ember_config("mha-untied"))
    save_model(model, tmp_path / "m", max_shard_bytes=40_000, dtype=torch.bfloat16, eos_token_id=[0, 1])
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" in index["weight_map"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    again = load_model(tmp_path / "m")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name


BASE = dict(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
            num_attention_heads=4)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma2"}, "model_type = 'gemma2': not supported .Ember runs 'llama', 'qwen2', 'qwen3', 'mistral'"),
    ({"model_type": "qwen2", "architectures": ["LlamaForCausalLM"]}, "expected Qwen2ForCausalLM"),
    ({"attention_bias": True}, "attention_bias = True: not supported"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias = True: not supported .qwen3 models"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window = True: not supported"),
    ({"model_type": "qwen3", "layer_types": ["sliding_attention"]},
     "layer_types = .'sliding_attention'.: only full_attention"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window = 0: must be a positive integer"),
    ({"mlp_bias": True}, "mlp_bias = True: not supported"),
    ({"sliding_window": 4096}, "sliding_window = 4096: not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type = 'yarn': not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type = 'linear': not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 scaling needs low_freq_factor"),
    ({"hidden_size": "48"}, "hidden_size = '48': missing or not an integer"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads (3)"),
])
def test_unsupported_configs_name_the_field_and_value(change, message):
    with pytest.raises(EmberError, match=f"config.json: .*{message.replace('(', '.').replace(')', '.')}"):
        config_from_hf({**BASE, **change})


def test_missing_and_mismatched_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(Transformer(ember_config("mha-untied")), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(48)
    save_file(tensors, weights)
    with pytest.raises(EmberError, match=r"missing tensors: model.layers.2.mlp.up_proj.weight; "
                                         r"unexpected tensors: model.layers.0.self_attn.q_proj.bias"):
        load_model(tmp_path / "m")
    del tensors["model.layers.0.self_attn.q_proj.bias"]
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(96, 47)
    save_file(tensors, weights)
    with pytest.raises(EmberError, match=r"tensor model.layers.2.mlp.up_proj.weight has shape \(96, 47\), "
                                         r"config.json implies \(96, 48\)"):
        load_model(tmp_path / "m")


def test_pickled_weights_are_never_loaded(tmp_path):
    save_model(Transformer(ember_config("mha-untied")), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(EmberError, match="found pytorch_model.bin: Ember never unpickles weights"):
        load_model(tmp_path / "m")
    with pytest.raises(EmberError, match="model directory not found"):
        load_model(tmp_path / "nowhere")


def test_parameter_counts_match_the_modules_and_the_llama_sizes():
    for name in ("mha-untied", "gqa-tied", "mqa-odd-head-dim"):
        cfg = ember_config(name)
        model = Transformer(cfg)
        assert num_parameters(cfg) == sum(p.numel() for p in model.parameters()), name
    assert set(PRESETS) >= {"tiny", "125m", "350m", "1b", "3b", "8b"}
    assert abs(num_parameters(preset("1b")) / 1.236e9 - 1) < 0.01  # Llama 3.2 1B
    assert abs(num_parameters(preset("3b")) / 3.213e9 - 1) < 0.01  # Llama 3.2 3B
    assert abs(num_parameters(preset("8b")) / 8.030e9 - 1) < 0.01  # Llama 3.1 8B
    assert 100e6 < num_parameters(preset("125m")) < 150e6 and 300e6 < num_parameters(preset("350m")) < 400e6


def test_training_flops_per_token_follow_the_palm_formula():
    from ember.model import flops_per_token

    cfg = preset("125m")
    matmul_params = num_parameters(cfg) - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    assert flops_per_token(cfg, 0) == 6 * matmul_params  # the input embedding is a lookup, not a matmul
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 2048
    assert flops_per_token(cfg, 2048) == 6 * matmul_params + attention


def test_the_tiny_preset_runs_and_the_model_plane_imports_no_ray_or_deepspeed():
    import subprocess
    import sys

    model = Transformer(preset("tiny", vocab_size=64))
    assert model(torch.randint(0, 64, (2, 16))).shape == (2, 16, 64)
    code = "import sys, ember.model; print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stderr


def test_an_ember_model_dir_with_its_tokenizer_works_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    from conftest import sentences
    from ember.data.tokenizer import EOS_TOKEN, save_tokenizer, train_tokenizer

    tok = train_tokenizer(sentences(200), vocab_size=320)
    save_tokenizer(tok, tmp_path / "tok", model_max_length=96)
    model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=96, tie_word_embeddings=True)).eval()
    save_model(model, tmp_path / "m", tokenizer_dir=tmp_path / "tok", eos_token_id=tok.token_to_id(EOS_TOKEN))
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    text = "The model reads a corpus of text."
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.eos_token == EOS_TOKEN
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    ours = generate_ids(model, [ids[0].tolist()], SamplingParams(max_new_tokens=12, temperature=0),
                        stop_ids={tok.token_to_id(EOS_TOKEN)})[0]
    assert ours == expected[: len(ours)] and (len(ours) == 12 or expected[len(ours)] == tok.token_to_id(EOS_TOKEN))


def _both_kernels(model, run):
    """`run()`'s outputs with masked attention through SDPA's dense mask and through FlexAttention's block mask."""
    outputs = {}
    for kernel in ("sdpa", "flex"):
        model.attention = kernel
        outputs[kernel] = run()
    return outputs["sdpa"], outputs["flex"]


@pytest.mark.parametrize("name", ["gqa-tied", "mha-untied"])
def test_flex_attention_equals_the_dense_mask_on_packed_segments(name):
    """Packed rows (3 sequences, then 1, the lengths crossing FlexAttention's 128-token blocks): the same logits
    through either kernel, and each sequence's as if alone (torch has no FlexAttention backward on CPU; the GPU test
    compares gradients)."""
    torch.manual_seed(20)
    model = Transformer(dataclasses.replace(ember_config(name), max_position_embeddings=320)).eval()
    x = tokens(2, 300, seed=21)
    segments = torch.tensor([[0] * 40 + [1] * 150 + [2] * 110, [0] * 300])
    with torch.no_grad():
        dense, flex = _both_kernels(model, lambda: model(x, segments=segments))
        alone = model(x[:1, 40:190])[0]  # the second packed sequence on its own
    assert torch.allclose(flex, dense, atol=1e-5, rtol=0)
    assert torch.allclose(flex[0, 40:190], alone, atol=1e-5, rtol=0)


def test_flex_attention_equals_the_dense_mask_on_a_ragged_kv_cache():
    """Rows of different lengths prefilled into one cache, then decoded together: the same logits at every step."""
    torch.manual_seed(22)
    model = Transformer(ember_config("gqa-tied")).eval()
    lengths = torch.tensor([5, 70, 33])
    padded = tokens(3, 70, seed=23)

    def run():
        cache = KVCache(model.config, 3, 90)
        out = [model(padded, cache=cache, num_new=lengths, last_only=True)]
        for step in range(8):
            nxt = out[-1].argmax(-1)[:, None]
            out.append(model(nxt, cache=cache, num_new=torch.ones(3, dtype=torch.long), last_only=True))
        return torch.stack(out)

    with torch.no_grad():
        dense, flex = _both_kernels(model, run)
    assert torch.allclose(flex, dense, atol=1e-5, rtol=0)


def test_the_attention_kernel_is_flex_only_where_chosen_or_on_cuda():
    from ember.model.llama import uses_flex

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_flex("auto", cpu, 64) and uses_flex("auto", cuda, 64) and uses_flex("flex", cpu, 64)
    assert not uses_flex("auto", cuda, 22) and not uses_flex("sdpa", cuda, 64)  # a head size flex's kernel lacks
    with pytest.raises(ValueError, match="attention kernel 'fast' is not one of auto, sdpa, flex"):
        uses_flex("fast", cpu, 64)


@pytest.mark.gpu
def test_on_a_gpu_flex_attention_equals_the_dense_mask():
    """The compiled FlexAttention kernel Ember picks on CUDA against SDPA's dense mask, packed and with a cache."""
    torch.manual_seed(24)
    model = Transformer(ember_config("gqa-tied")).cuda().eval()
    x, segments = tokens(2, 64, seed=25).cuda(), torch.tensor([[0] * 20 + [1] * 44, [0] * 64]).cuda()
    def packed():
        model.zero_grad()
        logits = model(x, segments=segments)
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    (dense, dense_grads), (flex, flex_grads) = _both_kernels(model, packed)
    assert torch.allclose(flex, dense, atol=1e-4, rtol=0)
    assert all(torch.allclose(f, d, atol=1e-4, rtol=1e-3) for f, d in zip(flex_grads, dense_grads))
    with torch.no_grad():
        def decode():
            cache = KVCache(model.config, 2, 80, device="cuda")
            first = model(x, cache=cache, num_new=torch.tensor([9, 64], device="cuda"), last_only=True)
            one = torch.ones(2, dtype=torch.long, device="cuda")
            return torch.stack([first, model(x[:, :1], cache=cache, num_new=one, last_only=True)])

        dense, flex = _both_kernels(model, decode)
        assert torch.allclose(flex, dense, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_on_a_gpu_bf16_matches_fp32_and_the_cache_matches_a_full_forward():
    torch.manual_seed(12)
    model = Transformer(ember_config("llama3-rope")).eval()
    x = tokens(4, 64, seed=13)
    with torch.no_grad():
        reference = model(x)
        gpu = model.to("cuda", torch.bfloat16)
        got = gpu(x.cuda()).cpu()
        assert (got - reference).abs().max() < 0.05 * reference.abs().max()
        cache = KVCache(gpu.config, 4, 80, dtype=torch.bfloat16, device="cuda")
        gpu(x[:, :40].cuda(), cache=cache)
        step = gpu(x[:, 40:41].cuda(), cache=cache)[:, 0].cpu()
        assert torch.allclose(step, gpu(x[:, :41].cuda())[:, -1].cpu(), atol=0.1)


@pytest.mark.parametrize("tied", [False, True])
def test_grown_vocabulary_rows_start_at_the_mean_of_the_old_ones(tied):
    """Tokens added for chat templates get embedding and output rows equal to the mean of the existing rows; the
    old rows are unchanged, and a tied head stays tied."""
    from ember.model import resize_vocab

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=50, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               num_key_value_heads=2, tie_word_embeddings=tied))
    emb, head = model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    resize_vocab(model, 53)
    assert model.config.vocab_size == 53 and model.embed_tokens.weight.shape == (53, 32)
    assert torch.equal(model.embed_tokens.weight[:50], emb) and torch.equal(model.lm_head.weight[:50], head)
    for new in range(50, 53):
        assert torch.allclose(model.embed_tokens.weight[new], emb.mean(0), atol=1e-7)
        assert torch.allclose(model.lm_head.weight[new], head.mean(0), atol=1e-7)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    logits = model(torch.tensor([[1, 51, 2]]))
    assert logits.shape == (1, 3, 53) and torch.isfinite(logits).all()


@pytest.mark.parametrize("tie", [False, True])
def test_a_model_built_on_the_meta_device_has_the_weights_of_the_eager_build(tie, tmp_path):
    """`build_model` makes the weights once, on the device a run trains on (a GPU worker's host never holds them);
    under the same seed they are exactly `Transformer(cfg)`'s, so a run trains to the same losses as before. Its
    state dict written by `save_weights` (the ZeRO-3 export's path, with no model built) loads back the same."""
    from ember.model import save_weights

    cfg = preset("tiny", vocab_size=320, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(3)
    eager = Transformer(cfg)
    torch.manual_seed(3)
    built = build_model(cfg)
    assert eager.state_dict().keys() == built.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), built.state_dict().values()))
    assert torch.equal(eager.inv_freq, built.inv_freq)
    assert (built.lm_head.weight is built.embed_tokens.weight) == tie
    ids = torch.randint(0, 320, (2, 12))
    assert torch.equal(eager(ids), built(ids))
    torch.manual_seed(3)
    half = build_model(cfg, dtype=torch.bfloat16)  # a bf16 run's model: never in fp32 as a whole
    assert all(b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)
               for a, b in zip(eager.state_dict().values(), half.state_dict().values()))
    assert half.inv_freq.dtype == torch.float32 and (half.lm_head.weight is half.embed_tokens.weight) == tie
    state = {k: v.to(torch.bfloat16) for k, v in built.state_dict().items()}  # as ZeRO 3 gathers it, in 16 bits
    loaded = load_model(save_weights(state, cfg, tmp_path / "m", dtype=torch.bfloat16), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())


BUILD_PEAK = """
import sys, torch
from ember.model import Transformer, build_model, preset


def status(field):  # KiB; VmHWM is this process's own peak (ru_maxrss would carry the forking parent's over exec)
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])


cfg = preset("125m")
before = status("VmRSS")
if sys.argv[1] == "eager":  # the path before: the fp32 model, then DeepSpeed's cast to the training precision
    model = Transformer(cfg).to(torch.bfloat16)
else:
    model = build_model(cfg, dtype=torch.bfloat16)
print(status("VmHWM") - before)
"""


def test_building_the_125m_preset_for_a_bf16_run_takes_less_host_memory():
    """Peak resident memory of making a bf16 run's `125m` model, each way in a fresh process: `build_model` holds the
    16-bit model and one module in fp32 at most, where the eager build held the whole model in fp32 first."""
    import os
    import subprocess
    import sys

    def peak(how: str) -> int:
        # A fixed mmap threshold: each large tensor is its own mapping, returned when freed, so the peak is what the
        # build holds rather than what glibc's heap happens to keep after earlier frees.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = subprocess.run([sys.executable, "-c", BUILD_PEAK, how], capture_output=True, text=True, check=True,
                             env=env)
        return int(out.stdout.split()[-1])

    eager, built = peak("eager"), peak("meta")
    params_kib = num_parameters(preset("125m")) * 4 / 2**10  # the fp32 weights, in KiB
    print(f"125m build peak: eager {eager / 2**10:.0f} MiB, meta+bf16 {built / 2**10:.0f} MiB, "
          f"ratio {built / eager:.2f}")
    assert eager > 0.9 * params_kib  # the eager build did hold the fp32 weights
    assert built / eager < 0.85


def test_a_weight_index_entry_outside_the_model_dir_is_refused(tmp_path):
    """`model.safetensors.index.json` naming `../x.safetensors` would load weights from outside the model dir."""
    from ember.model.hf import _weight_files
    from ember.model.hf_format import INDEX

    (tmp_path / "m").mkdir()
    for bad in ("../x.safetensors", "/etc/x.safetensors", "a/../../x.safetensors"):
        (tmp_path / "m" / INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": bad}}))
        with pytest.raises(EmberError, match=rf"{INDEX}: refusing '{re.escape(bad)}': not a plain relative path"):
            _weight_files(tmp_path / "m")
