"""`kind: preference` on real Ray Train + DeepSpeed: DPO with LoRA under ZeRO 3 (the reference is the base with the
adapters off) through a killed worker, and full DPO under ZeRO 2 against the reference figures of a Ray Data pass
(its first step is exactly DPO at the reference, loss ln 2), a reference-free SimPO run, and `kind: evaluate`'s
preference accuracy, which the tuned model raises over its base on held-out pairs."""

from __future__ import annotations

import json
import math
import random
import threading
from pathlib import Path

import pytest

from conftest import kill_a_worker_once_checkpointed, merged, tiny_model_dir, train_worker_pids
from ember import storage
from ember.config import parse_spec
from ember.errors import EmberError
from ember.eval.evaluate import run_evaluate
from ember.train.preference import run_preference

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

ANIMALS = ("fox crow whale horse tiger eagle frog snake camel otter panda koala zebra moose bison heron trout "
           "shark lemur gecko").split()
COLORS = "red black blue brown orange white green gray yellow silver".split()
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def color(animal: str) -> str:
    return COLORS[len(animal) * 7 % len(COLORS)]


def pairs(n: int, seed: int) -> list[dict]:
    """Which color is an animal: the right one chosen, another rejected; every other pair as two conversations."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        animal = rng.choice(ANIMALS)
        wrong = rng.choice([c for c in COLORS if c != color(animal)])
        question = f"What color is the {animal}?"
        chosen, rejected = f"The {animal} is {color(animal)}.", f"The {animal} is {wrong}."
        if i % 2:
            turns = [{"role": "user", "content": question}]
            out.append({"chosen": [*turns, {"role": "assistant", "content": chosen}],
                        "rejected": [*turns, {"role": "assistant", "content": rejected}]})
        else:
            out.append({"prompt": question, "chosen": chosen, "rejected": rejected})
    return out


@pytest.fixture(scope="session")
def pref_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prefs")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(160, seed=1)))
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(40, seed=2)))
    return {"train": root / "train.jsonl", "heldout": root / "heldout.jsonl"}


@pytest.fixture(scope="session")
def pref_base(tmp_path_factory) -> Path:
    """An Ember model dir: tiny random weights, a tokenizer with ChatML tokens and Ember's template."""
    texts = [f"What color is the {a}? The {a} is {c}." for a in ANIMALS for c in COLORS] * 3
    return tiny_model_dir(tmp_path_factory.mktemp("pref-base"), texts, 320, 128, hidden_size=64,
                          intermediate_size=128)


def spec(base: Path, train_file: Path, run_dir: Path, **sections) -> dict:
    return merged({"kind": "preference", "base": str(base),
                   "data": {"inputs": [str(train_file)], "seq_len": 32, "val_fraction": 0.1},
                   "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 12, "lr": 2e-3,
                             "warmup_steps": 0, "log_every": 1, "eval_every": 6, "eval_batches": 2,
                             "checkpoint_every": 6},
                   "deepspeed": {"zero_stage": 2}, "scaling": {"workers": 2},
                   "output": {"dir": str(run_dir)}}, **sections)


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(str(run_dir), "metrics.jsonl")).splitlines()]


@pytest.fixture(scope="session")
def full_dpo_run(pref_base, pref_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pref-full") / "run"
    run_preference(parse_spec(spec(pref_base, pref_data["train"], run_dir, method="full")))
    return run_dir


def test_full_dpo_starts_at_the_reference_and_learns_the_preferences(full_dpo_run):
    metrics = rows(full_dpo_run)
    assert [r["step"] for r in metrics] == list(range(1, 13))
    first, last = metrics[0], metrics[-1]
    for key in REWARDS:
        assert all(math.isfinite(r[key]) for r in metrics), key
    # Step 1's loss is taken before any update: the policy is the reference the Ray Data pass scored, so DPO's loss
    # is exactly ln 2 and every reward 0 (a reference of another model, seed or vocabulary would not give this).
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-4) and first["rewards/margins"] == pytest.approx(0,
                                                                                                             abs=1e-4)
    assert last["loss"] < 0.5 and last["rewards/margins"] > 0.5 and last["rewards/accuracies"] > 0.8
    assert last["tokens"] == 12 * 8 * 32 * 2  # both sides of every pair
    assert "val_loss" in metrics[5] and "val_ppl" not in metrics[5]
    reference = sorted((full_dpo_run / "data" / "reference").iterdir())
    assert len(reference) == 1 and {p.name for p in reference[0].iterdir()} == {"train.arrow", "val.arrow",
                                                                                 "reference.json"}
    result = json.loads((full_dpo_run / "result.json").read_text())
    assert result["metrics"]["step"] == 12 and (full_dpo_run / "model" / "model.safetensors").is_file()


def test_the_tuned_model_prefers_the_chosen_answers_of_held_out_pairs_more_than_its_base(full_dpo_run, pref_base,
                                                                                         pref_data, tmp_path):
    out = tmp_path / "eval.json"
    results = run_evaluate(parse_spec({"kind": "evaluate", "models": {"base": str(pref_base),
                                                                      "tuned": str(full_dpo_run / "model")},
                                       "data": {"pairs": [str(pref_data["heldout"])], "batch_size": 8},
                                       "output": {"file": str(out)}}))
    base, tuned = results["base"]["pairs"], results["tuned"]["pairs"]
    assert base["pairs"] == tuned["pairs"] == 40
    assert tuned["preference_accuracy"] > max(0.8, base["preference_accuracy"])
    assert tuned["mean_margin"] > base["mean_margin"] + 1.0
    assert json.loads(out.read_text())["tuned"]["pairs"] == tuned


def test_lora_dpo_under_zero_3_restores_a_killed_worker_and_exports_adapters(pref_base, pref_data, tmp_path):
    run_dir, killed = tmp_path / "run", {}


    killer = threading.Thread(target=kill_a_worker_once_checkpointed,
                              args=(str(run_dir), train_worker_pids, killed, 4, 12), daemon=True)
    killer.start()
    run_preference(parse_spec(spec(pref_base, pref_data["train"], run_dir, method="lora",
                                   lora={"rank": 4, "alpha": 8, "dropout": 0.0},
                                   train={"checkpoint_every": 4, "lr": 5e-3}, deepspeed={"zero_stage": 3},
                                   failure={"max_failures": 1})))
    killer.join()
    assert killed and killed["registered"] < killed["at"] < 12, killed
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(1, 13))  # every step once: those after the restore redone
    [restore] = [json.loads(line) for line in (run_dir / "restores.jsonl").read_text().splitlines()]
    redone = {r["step"]: r for r in metrics}
    for before in restore["superseded"]:
        assert abs(before["loss"] - redone[before["step"]]["loss"]) < 1e-5, before  # the same steps again
    # The reference is the base (adapters off), which LoRA starts equal to: step 1 is DPO at the reference.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]
    assert not (run_dir / "data" / "reference").exists()  # no second model's figures: the base is the reference
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and (run_dir / "model" / "model.safetensors").is_file()


def test_simpo_is_reference_free(pref_base, pref_data, tmp_path):
    run_dir = tmp_path / "run"
    run_preference(parse_spec(spec(pref_base, pref_data["train"], run_dir, method="full",
                                   preference={"loss": "simpo", "beta": 2.0, "gamma": 0.5},
                                   train={"max_steps": 4, "eval_every": 0, "checkpoint_every": 4},
                                   deepspeed={"zero_stage": 0}, scaling={"workers": 1})))
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert not (run_dir / "data" / "reference").exists()
    # SimPO's reward is beta times the length-averaged log-probability: negative, and not 0 at the start.
    assert metrics[0]["rewards/chosen"] < 0 and metrics[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)


def test_bad_preference_specs_are_named(pref_base, pref_data, tmp_path):
    base = spec(pref_base, pref_data["train"], tmp_path / "run")
    with pytest.raises(EmberError, match="preference.gamma is SimPO's margin; loss is dpo"):
        parse_spec(merged(base, preference={"gamma": 1.0}))
    with pytest.raises(EmberError, match="preference.lambda is ORPO's weight"):
        parse_spec(merged(base, preference={"loss": "ipo", "lambda": 1.0}))
    with pytest.raises(EmberError, match="preference.beta"):
        parse_spec(merged(base, preference={"beta": float("nan")}))
    with pytest.raises(EmberError, match="preference.beta is not ORPO's"):
        parse_spec(merged(base, preference={"loss": "orpo", "beta": 0.5}))
    with pytest.raises(EmberError, match="unknown key 'preference.los'"):
        parse_spec(merged(base, preference={"los": "dpo"}))
    assert parse_spec(merged(base, preference={"loss": "orpo", "lambda": 0.2})).preference.odds_weight == 0.2
