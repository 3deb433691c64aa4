"""`kind: finetune` and `kind: evaluate` on real Ray Train + DeepSpeed: full fine-tuning of a model saved by
`transformers` (chat tokens added, embeddings resized, the result loads back in `transformers`), LoRA (only the
adapters change; the merged export equals base + adapters, also as PEFT computes it), bad records, and an evaluation
in which the fine-tuned model beats its base on held-out conversations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import merged, tiny_model_dir
from ember import storage
from ember.config import parse_spec
from ember.data.tokenizer import load_tokenizer
from ember.errors import EmberError
from ember.eval.evaluate import run_evaluate
from ember.model import load_model, save_model
from ember.train.finetune import run_finetune

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

ANIMALS = ("fox crow whale horse tiger eagle frog snake camel otter panda koala zebra moose bison heron trout "
           "shark lemur gecko").split()
COLORS = "red black blue brown orange white green gray yellow silver".split()


def qa(animal: str) -> tuple[str, str]:
    return f"What color is the {animal}?", f"The {animal} is {COLORS[len(animal) * 7 % len(COLORS)]}."


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a = qa(rng.choice(ANIMALS))
        if i % 3 == 0:
            out.append({"messages": [{"role": "system", "content": "Answer briefly."},
                                     {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif i % 3 == 1:
            out.append({"prompt": q, "response": a})
        else:
            out.append({"instruction": q, "output": a})
    return out


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    lines = [json.dumps(r) for r in conversations(400, seed=1)]
    lines.insert(10, '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}')
    lines.insert(20, "{not json")
    lines.insert(30, json.dumps({"messages": [{"role": "user", "content": "alone"}]}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations(40, seed=2)))
    (root / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations(120, seed=3)))
    return {"train": root / "train.jsonl", "heldout": root / "heldout.jsonl", "more": root / "more.jsonl",
            "root": root}


def _tokenizer_text() -> list[str]:
    return [f"{q} {a} Answer briefly." for q, a in (qa(x) for x in ANIMALS)] * 30


@pytest.fixture(scope="session")
def ember_base(tmp_path_factory) -> Path:
    """An Ember model dir: tiny random weights, a tokenizer with ChatML tokens and Ember's template."""
    return tiny_model_dir(tmp_path_factory.mktemp("ember-base"), _tokenizer_text(), 320, 128, hidden_size=64,
                          intermediate_size=128)


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory) -> Path:
    """A tiny Llama saved by `transformers`, with a tokenizer that has no chat tokens and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("hf-base") / "model"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_tokenizer_text(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(root))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0,
                      bos_token_id=7, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(root))
    return root


@pytest.fixture(scope="session")
def qwen_base(tmp_path_factory) -> Path:
    """A tiny Qwen2 (Qwen2.5's layout: q/k/v biases, tied embeddings, rope_theta 1e6) saved by `transformers`, with
    every tensor random and a tokenizer carrying Qwen2.5's own chat template (its default system prompt) in
    chat_template.jinja, as `transformers` saves one now."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from ember.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("qwen-base") / "model"
    tok = train_tokenizer(_tokenizer_text() + ["You are Qwen, created by Alibaba Cloud. You are a helpful "
                                               "assistant."] * 20, 320)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.chat_template = (Path(__file__).parent / "templates" / "qwen2.5.jinja").read_text()
    hf_tok.save_pretrained(str(root))
    eos = tok.token_to_id("<|im_end|>")
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=eos,
                      bos_token_id=None, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(str(root))
    return root


def spec(base: Path, train_file: Path, run_dir: Path, **sections) -> dict:
    data = {"kind": "finetune", "base": str(base),
            "data": {"inputs": [str(train_file)], "seq_len": 64, "val_fraction": 0.1},
            "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 30, "lr": 3e-3, "min_lr": 3e-4,
                      "warmup_steps": 3, "log_every": 5, "eval_every": 15, "eval_batches": 2,
                      "checkpoint_every": 15},
            "deepspeed": {"zero_stage": 2}, "scaling": {"workers": 2}, "output": {"dir": str(run_dir)}}
    return merged(data, **sections)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def full_run(hf_base, chat_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ft") / "full"
    run_finetune(parse_spec(spec(hf_base, chat_data["train"], run_dir)))
    return run_dir


@pytest.fixture(scope="session")
def lora_run(qwen_base, chat_data, tmp_path_factory) -> Path:
    """LoRA on the Qwen2 base (the adapters in PEFT's format, for Qwen2's module names), on a mixture of two sets
    of conversations, 3:1, the smaller one recycled."""
    run_dir = tmp_path_factory.mktemp("ft") / "lora"
    mix = {"inputs": None, "exhausted": "recycle", "mix": [
        {"inputs": [str(chat_data["train"])], "weight": 3, "name": "chats"},
        {"inputs": [str(chat_data["more"])], "weight": 1, "name": "more"}]}
    run_finetune(parse_spec(spec(qwen_base, chat_data["train"], run_dir, method="lora", data=mix, train={"lr": 1e-2},
                                 lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                                 scaling={"workers": 1})))
    return run_dir


@pytest.fixture(scope="session")
def ember_full_run(ember_base, chat_data, s3_server) -> str:
    """A full fine-tune on object storage (the S3 server on 127.0.0.1): the base model, the tokenized conversations
    and the run dir are all in the bucket; the workers read the base through their node cache."""
    bucket, endpoint, client = s3_server
    root = f"s3://{bucket}/finetune?endpoint_override={endpoint}&scheme=http"
    base, run_dir = storage.join(root, "base"), storage.join(root, "ember-full")
    storage.upload_dir(ember_base, base, marker="config.json")
    run_finetune(parse_spec(spec(base, chat_data["train"], run_dir, scaling={"workers": 1},
                                 deepspeed={"zero_stage": 1})))
    objects = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="finetune/ember-full/")["Contents"]}
    for key in ("result.json", "metrics.jsonl", "spec.yaml", "base_weights.json", "data/manifest.json",
                "model/config.json", "model/model.safetensors", "model/tokenizer_config.json"):
        assert f"finetune/ember-full/{key}" in objects, key
    assert any(k.startswith("finetune/ember-full/checkpoint_") for k in objects)  # Ray Train's, in the bucket
    return run_dir


def test_full_finetune_of_a_transformers_model_adds_chat_tokens_and_loads_back_in_transformers(full_run, hf_base):
    from transformers import AutoTokenizer, LlamaForCausalLM

    manifest = json.loads((full_run / "data" / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["added_tokens"] == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    c = manifest["conversations"]
    assert c["kept"] == 400 and c["skipped"] == {"malformed_json": 1, "no_assistant_turn": 1, "unknown_role": 1}
    assert any("train.jsonl:11: messages[0] has unknown role 'wizard'" in e for e in c["examples"])
    assert any("train.jsonl:21: malformed JSON" in e for e in c["examples"]), c["examples"]
    metrics = rows(full_run)
    assert metrics[-1]["step"] == 30 and metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]
    assert metrics[-1]["val_loss"] < metrics[2]["val_loss"]

    hf = LlamaForCausalLM.from_pretrained(str(full_run / "model")).eval()
    assert hf.config.vocab_size == 300 + 3 and hf.config.bos_token_id == 7  # the base's, kept
    ours = load_model(full_run / "model")
    ids = torch.tensor([[5, 17, 301, 40, 302, 9]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(full_run / "model"))
    text = tok.apply_chat_template([{"role": "user", "content": "What color is the fox?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat color is the fox?<|im_end|>\n<|im_start|>assistant\n"
    eos = json.loads((full_run / "model" / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos


def test_resuming_a_run_whose_conversations_changed_is_refused(full_run, hf_base, chat_data):
    before = (full_run / "data" / "manifest.json").read_text()
    with pytest.raises(EmberError, match="changed since .* wrote its checkpoints"):
        run_finetune(parse_spec(spec(hf_base, chat_data["train"], full_run, data={"seq_len": 48})))
    assert (full_run / "data" / "manifest.json").read_text() == before  # the run's data is untouched


def test_a_data_dir_holding_another_dataset_is_refused_unless_data_overwrite(hf_base, chat_data, tmp_path):
    """`data.dir` naming a dir that holds another dataset (a pretraining one, as `--set data.dir=data/python-docs`
    would) is refused before anything in it is touched, as tokenize refuses its output.dir; `data.overwrite: true`
    replaces it."""
    from conftest import sentences
    from ember.config.specs import ChatDataSpec
    from ember.data.pipeline import run_tokenize
    from ember.data.sft import prepare_chat_dataset

    docs = tmp_path / "python-docs"
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(200, seed=3)))
    run_tokenize(parse_spec({"kind": "tokenize", "source": {"inputs": [str(tmp_path / "corpus.jsonl")]},
                             "tokenizer": {"vocab_size": 300}, "pack": {"seq_len": 32},
                             "output": {"dir": str(docs)}}))
    before = {p: p.read_bytes() for p in docs.rglob("*") if p.is_file()}
    tiny = {"max_steps": 2, "checkpoint_every": 2, "eval_every": 2}
    with pytest.raises(EmberError, match=rf"^{docs} holds a different dataset .*; set data\.overwrite: true to "
                                         r"replace it, or choose another data\.dir"):
        run_finetune(parse_spec(spec(hf_base, chat_data["train"], tmp_path / "run", data={"dir": str(docs)},
                                     train=tiny, scaling={"workers": 1})))
    assert {p: p.read_bytes() for p in docs.rglob("*") if p.is_file()} == before, "the dataset was touched"
    data = ChatDataSpec(inputs=[str(chat_data["train"])], seq_len=64, dir=str(docs), overwrite=True)
    assert prepare_chat_dataset(data, hf_base, docs, 128)["kind"] == "sft"


def test_resuming_a_fine_tune_of_a_base_retrained_since_is_refused(full_run, hf_base, chat_data, tmp_path):
    """The run's checkpoints were made from the base as it was: once the base's weights are rewritten in place,
    continuing them is refused before anything is touched (a copy of the run and its base, so others keep theirs)."""
    import shutil

    from ember.identity import write_stamp
    from ember.model.hf import weights_fingerprint
    from ember.runs.run_dir import RunDir

    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(hf_base, base)
    shutil.copytree(full_run, run, symlinks=True)
    write_stamp(run / RunDir.BASE_WEIGHTS, weights_fingerprint(base))  # the copy was made from this base
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    model = load_model(base)
    with torch.no_grad():
        model.norm.weight.add_(0.5)
    for weights in save_model(model, tmp_path / "retrained").glob("model*.safetensors"):
        shutil.copy(weights, base / weights.name)  # retrained in place: new weights, the same tokenizer
    with pytest.raises(EmberError, match="holds a fine-tune of an earlier version of .* \\(its weights changed"):
        run_finetune(parse_spec(spec(base, chat_data["train"], run, train={"max_steps": 40})))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_lora_changes_only_adapters_and_the_merged_export_is_base_plus_adapters(lora_run, qwen_base):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    adapter = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    base, merged = load_file(str(qwen_base / "model.safetensors")), load_file(str(lora_run / "model" /
                                                                                  "model.safetensors"))
    assert set(base) == set(merged) and "model.layers.0.self_attn.q_proj.bias" in base
    scale = 8 / 4
    for name, weight in base.items():
        module, kind = name.rsplit(".", 1)
        key = f"base_model.model.{module}.lora_A.weight"
        if key in adapter and kind == "weight":
            delta = adapter[key.replace("lora_A", "lora_B")] @ adapter[key] * scale
            assert delta.abs().max() > 1e-4, name  # the adapter trained
            assert torch.allclose(merged[name], weight + delta, atol=1e-5), name
        else:
            assert torch.equal(merged[name], weight), name  # frozen (biases included): bit for bit the base
    assert sum(1 for k in adapter if k.endswith("lora_A.weight")) == 3 * 2  # 3 targets x 2 layers

    # PEFT applies the saved adapter to the Qwen2 base as Ember merged it; the export is a Qwen2 model dir.
    hf_base = AutoModelForCausalLM.from_pretrained(str(qwen_base))
    peft = PeftModel.from_pretrained(hf_base, str(lora_run / "adapter")).merge_and_unload().eval()
    exported = AutoModelForCausalLM.from_pretrained(str(lora_run / "model")).eval()
    assert type(peft) is type(exported) is Qwen2ForCausalLM
    ids = torch.tensor([[3, 50, 7, 99, 12]])
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, load_model(lora_run / "model")(ids), atol=1e-4)
        assert torch.allclose(peft(ids).logits, exported(ids).logits, atol=1e-4)


def test_a_fine_tune_on_a_mixture_draws_each_source_by_weight_and_records_its_tokens(lora_run):
    """Each source's conversations are a dataset of their own (DATA_DIR/NAME); every metrics row counts the
    training tokens each gave, the mixture's counts at its sample count; result.json records the mixture."""
    from ember.data.mixture import Mixture

    manifests = {name: json.loads((lora_run / "data" / name / "manifest.json").read_text()) for name in ("chats",
                                                                                                     "more")}
    assert manifests["chats"]["tokenizer"] == manifests["more"]["tokenizer"]  # the base's, for both
    for r in rows(lora_run):
        chats, more = Mixture([3, 1]).counts(r["samples"])
        assert (r["tokens/chats"], r["tokens/more"]) == (64 * chats, 64 * more)
    mixture = json.loads((lora_run / "result.json").read_text())["mixture"]
    assert [(s["name"], s["weight"], s["rows"]) for s in mixture["sources"]] == [
        (name, weight, manifests[name]["splits"]["train"]["rows"]) for name, weight in (("chats", 3), ("more", 1))]
    assert mixture["exhausted"] == "recycle" and mixture["tokens"]["chats"] == 3 * mixture["tokens"]["more"]


def test_the_lora_fine_tuned_qwen2_answers_through_the_openai_client_with_its_template(lora_run, serve_port):
    """Served as it was exported: the chat prompt is Qwen2.5's template (its default system prompt, as
    `apply_chat_template` renders it) and generation stops at its `<|im_end|>`."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from conftest import deployed, greedy

    messages = [{"role": "user", "content": "What color is the fox?"}]
    prompt = AutoTokenizer.from_pretrained(str(lora_run / "model")).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen")
    eos = json.loads((lora_run / "model" / "generation_config.json").read_text())["eos_token_id"]
    eos = set(eos) if isinstance(eos, list) else {eos}
    with deployed("qwen", serve_port, model_dir=str(lora_run / "model"), model_name="qwen") as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="qwen", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == greedy(lora_run / "model", prompt, 12, stop_ids=eos)
    assert chat.usage.prompt_tokens == len(load_tokenizer(lora_run / "model").encode(prompt,
                                                                                     add_special_tokens=False).ids)


def test_the_finetuned_model_beats_its_base_on_held_out_conversations(ember_full_run, ember_base, chat_data,
                                                                     tmp_path):
    results = run_evaluate(parse_spec({
        "kind": "evaluate", "models": {"base": str(ember_base), "finetuned": storage.join(ember_full_run, "model")},
        "data": {"dir": storage.join(ember_full_run, "data"), "conversations": [str(chat_data["heldout"])]},
        "generation": {"max_examples": 10, "max_new_tokens": 12},
        "output": {"file": storage.join(ember_full_run, "eval", "results.json")}}))
    assert storage.read_json(storage.join(ember_full_run, "eval", "results.json")) == results
    base, tuned = results["base"], results["finetuned"]
    assert tuned["conversations"]["assistant_loss"] < 0.5 * base["conversations"]["assistant_loss"]
    assert tuned["dataset"]["assistant_loss"] < base["dataset"]["assistant_loss"]
    assert tuned["conversations"]["token_f1"] > base["conversations"]["token_f1"]
    assert tuned["conversations"]["answered"] == 10 and len(tuned["conversations"]["examples"]) == 3

    # `ember report` shows the evaluation next to the training curves (results under RUN_DIR/eval/ are found).
    from ember.runs.report import write_report

    summary = write_report(ember_full_run)
    assert "evaluation s3://" in summary and "eval/results.json:" in summary
    line = next(x for x in summary.splitlines() if x.strip().startswith("finetuned"))
    assert f"conversations assistant loss {tuned['conversations']['assistant_loss']:.4f}" in line
    assert f"token F1 {tuned['conversations']['token_f1']:.3f}" in line
    with pytest.raises(EmberError, match="--eval .*nothing.json: no such results file"):
        write_report(ember_full_run, [str(tmp_path / "nothing.json")])


def test_conversation_scores_are_the_same_one_at_a_time_and_in_batches(ember_full_run, chat_data):
    """Right-padded batches of conversations give each one's loss and greedy answer as it gets alone."""
    from ember.eval.evaluate import conversation_scores, read_conversations

    model_dir = storage.join(ember_full_run, "model")
    model = load_model(model_dir)
    conversations = read_conversations([str(chat_data["heldout"])])[:12]
    alone = conversation_scores(model, model_dir, conversations, 6, 10, batch_size=1)
    together = conversation_scores(model, model_dir, conversations, 6, 10, batch_size=5)
    assert together["assistant_tokens"] == alone["assistant_tokens"] > 0
    assert together["assistant_loss"] == pytest.approx(alone["assistant_loss"], rel=1e-5)
    assert together["examples"] == alone["examples"] and together["token_f1"] == alone["token_f1"]


def test_the_lora_fine_tuned_qwen2_evaluates_better_than_its_base(lora_run, qwen_base, chat_data, mlflow_server,
                                                                   tmp_path):
    """And the figures go to MLflow as one run (`tracking.mlflow`), each as a metric named MODEL.SECTION.FIGURE."""
    import requests

    results = run_evaluate(parse_spec({
        "kind": "evaluate", "name": "qwen-eval", "models": {"base": str(qwen_base), "lora": str(lora_run / "model")},
        "data": {"dir": str(lora_run / "data" / "chats"), "conversations": [str(chat_data["heldout"])]},
        "generation": {"max_examples": 4, "max_new_tokens": 8}, "output": {"file": str(tmp_path / "e.json")},
        "tracking": {"mlflow": {"tracking_uri": mlflow_server, "experiment": "evaluations"}}}))
    assert results["lora"]["conversations"]["assistant_loss"] < results["base"]["conversations"]["assistant_loss"]
    assert results["lora"]["dataset"]["assistant_loss"] < results["base"]["dataset"]["assistant_loss"]
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "evaluations"}).json()
    [run] = requests.post(f"{api}/runs/search", json={"experiment_ids": [
        experiment["experiment"]["experiment_id"]]}).json()["runs"]
    assert run["info"]["run_name"] == "qwen-eval" and run["info"]["status"] == "FINISHED"
    logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    for model in ("base", "lora"):
        for section in ("dataset", "conversations"):
            key = f"{model}.{section}.assistant_loss"
            assert logged[key] == pytest.approx(results[model][section]["assistant_loss"]), key
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["models.lora"] == str(lora_run / "model")
    files = requests.get(f"{api}/artifacts/list", params={"run_id": run["info"]["run_id"]}).json()["files"]
    assert [f["path"] for f in files] == ["e.json"]


def test_bad_input_is_named_before_training(ember_base, hf_base, chat_data, lora_run, tmp_path):
    with pytest.raises(EmberError, match=r"train\.jsonl:11: messages\[0\] has unknown role 'wizard' .*"
                                         r"\(data\.strict is on\)"):
        run_finetune(parse_spec(spec(ember_base, chat_data["train"], tmp_path / "strict", data={"strict": True})))
    with pytest.raises(EmberError, match="is not a model directory"):
        run_finetune(parse_spec(spec(tmp_path / "nowhere", chat_data["train"], tmp_path / "r")))
    with pytest.raises(EmberError, match=r"data\.seq_len \(512\) is over the base model's context \(128 tokens\)"):
        run_finetune(parse_spec(spec(ember_base, chat_data["train"], tmp_path / "r", data={"seq_len": 512})))
    (tmp_path / "notes.txt").write_text("just text\n")
    with pytest.raises(EmberError, match="plain text holds no conversations"):
        run_finetune(parse_spec(spec(ember_base, tmp_path / "notes.txt", tmp_path / "r")))
    with pytest.raises(EmberError, match="input not found"):
        run_finetune(parse_spec(spec(ember_base, tmp_path / "missing.jsonl", tmp_path / "r")))
    with pytest.raises(EmberError, match=r"models\.base: model directory not found"):
        run_evaluate(parse_spec({"kind": "evaluate", "models": {"base": str(tmp_path / "gone")},
                                 "data": {"conversations": [str(chat_data["heldout"])]},
                                 "output": {"file": str(tmp_path / "e.json")}}))
    with pytest.raises(EmberError, match="differs from the dataset's"):
        run_evaluate(parse_spec({"kind": "evaluate", "models": {"hf": str(hf_base)},
                                 "data": {"dir": str(lora_run / "data" / "chats")},
                                 "output": {"file": str(tmp_path / "e.json")}}))


def test_generate_with_chat_wraps_the_prompt_in_the_template(ember_full_run, hf_base, capsys):
    from ember.cli import main
    from ember.data.chat import ChatTemplate
    from ember.data.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer
    from ember.model import SamplingParams, generate_ids

    model_dir = storage.join(ember_full_run, "model")  # a URI: read through the node cache
    assert main(["generate", str(model_dir), "--chat", "--prompt", "What color is the fox?", "--temperature", "0",
                 "--max-tokens", "12"]) == 0
    printed = capsys.readouterr().out.strip()
    tok = load_tokenizer(model_dir)
    prompt = ChatTemplate(DEFAULT_CHAT_TEMPLATE).render([{"role": "user", "content": "What color is the fox?"}], True)
    expected = generate_ids(load_model(model_dir), [tok.encode(prompt).ids],
                            SamplingParams(max_new_tokens=12, temperature=0.0).validate(),
                            {tok.token_to_id("<|im_end|>"), 0})[0]
    assert printed == tok.decode(expected).strip() and printed.startswith("The")  # its answers start so
    assert main(["generate", str(hf_base), "--chat", "--prompt", "hi"]) == 1
    assert "has no chat template" in capsys.readouterr().err


def test_fine_tuning_data_resumes_per_unit_with_shards_rolled_by_shard_bytes(hf_base, tmp_path):
    """The conversation tokenizer runs on the unit executor: a strict failure keeps the finished units, the rerun
    after the fix redoes only the unfinished ones (the others' shards are not rewritten), and the result is the
    dataset a clean run makes, in shards named and rolled as tokenize's are."""
    from ember.config.specs import ChatDataSpec
    from ember.data.sft import prepare_chat_dataset
    from ember.data.sources import plan_units, resolve_inputs

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        lines = [json.dumps(r) for r in conversations(80, seed=10 + i)]
        (corpus / f"{i}.jsonl").write_text("\n".join(lines) + "\n")
    good = (corpus / "3.jsonl").read_text()
    (corpus / "3.jsonl").write_text(good.replace('"prompt"', '"prompt_"', 1))
    settings = {"inputs": [str(corpus)], "seq_len": 64, "strict": True, "unit_bytes": 4096, "shard_bytes": 4096}
    out = tmp_path / "data"
    with pytest.raises(EmberError, match=r"3\.jsonl:\d+: .*\(data.strict is on\)"):
        prepare_chat_dataset(ChatDataSpec(**settings), hf_base, out, 128)
    finished = sorted((out / ".ember" / "units").glob("u*.json"))
    assert finished and not (out / "manifest.json").exists()
    units = plan_units(resolve_inputs(ChatDataSpec(**settings).source()), ChatDataSpec(**settings).source())
    untouched = {u.index for u in units if all("3.jsonl" not in s.name for s in u.segments)}  # its input stays
    kept = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.arrow") if int(p.name[1:7]) in untouched
            and (out / ".ember" / "units" / f"{p.name[:7]}.json") in finished}
    (corpus / "3.jsonl").write_text(good)
    manifest = prepare_chat_dataset(ChatDataSpec(**settings), hf_base, out, 128)
    assert kept and len(finished) < manifest["units"]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished units were not redone
    clean = prepare_chat_dataset(ChatDataSpec(**settings), hf_base, tmp_path / "clean", 128)
    names = [sh["file"] for sh in manifest["splits"]["train"]["shards"]]
    assert names == [sh["file"] for sh in clean["splits"]["train"]["shards"]]
    assert "u000000-001.arrow" in names and all(n.startswith("u0") and n.endswith(".arrow") for n in names)
    assert manifest["conversations"] == clean["conversations"]
    for name in names:
        assert (out / "train" / name).read_bytes() == (tmp_path / "clean" / "train" / name).read_bytes()
    assert not (out / ".ember").exists()
    # An unchanged job again (the same inputs, settings and base tokenizer: `tokenizer_identity`) is its dataset,
    # reused as it is.
    written = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.arrow")}
    assert prepare_chat_dataset(ChatDataSpec(**settings), hf_base, out, 128) == manifest
    assert {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.arrow")} == written
