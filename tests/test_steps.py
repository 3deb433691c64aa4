"""The tokenize steps as plain callables, without Ray."""

import numpy as np

from conftest import sentences
from ember.config.specs import FilterSpec
from ember.data.sources import SkipLog
from ember.data.steps import Normalizer, Packer, Tokenize, doc_hash, split_of
from ember.data.tokenizer import EOS_TOKEN, SPECIAL_TOKENS, eos_token, train_tokenizer


def test_normalizer_normalises_strips_and_counts_short_documents():
    skips = SkipLog()
    out = list(Normalizer(FilterSpec(min_chars=5), skips)(["  cafe\u0301 au lait ", "tiny", "\n\n"]))
    assert out == ["caf\u00e9 au lait"]
    assert skips.skipped == {"too_short": 2} and skips.examples == []


SPLIT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from conftest import sentences
from ember.data.steps import doc_hash, split_of
print(json.dumps([split_of(doc_hash(d), 0.1) for d in sentences(4000)]))
"""


def test_split_is_a_stable_function_of_the_text():
    """Golden values, and the same splits in another process with another PYTHONHASHSEED: a document's split can
    depend on nothing but its text (not on Python's salted hash(), nor on a set's order)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    docs = sentences(4000)
    splits = [split_of(doc_hash(d), 0.1) for d in docs]
    assert 0.07 < splits.count("val") / len(docs) < 0.13
    assert doc_hash("abc") == 6455300059550759896
    assert doc_hash("the whale lives in the sea") == 16292615662170647990
    assert doc_hash("caf\u00e9 \ud800") == 2340719704126057357  # a lone surrogate hashes too
    assert all(split_of(doc_hash(d), 0.0) == "train" for d in docs[:100])
    other = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, str(Path(__file__).parent)], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout) == splits


def test_packer_rows_are_documents_joined_by_eos_without_loss():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(5, 100, rng.integers(1, 40))) for _ in range(200)]
    packer = Packer(row_len=17, eos_id=0, dtype=np.uint16)
    rows = np.concatenate([packer(docs[:50]), packer(docs[50:120]), packer(docs[120:])])
    stream = np.concatenate([rows.reshape(-1), packer.remainder()])
    expected = [t for d in docs for t in d + [0]]
    assert rows.shape[1] == 17 and len(packer.remainder()) < 17
    assert stream.tolist() == expected


def test_trained_tokenizer_has_special_tokens_and_round_trips():
    tok = train_tokenizer(sentences(500), vocab_size=400)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert eos_token(tok) == (EOS_TOKEN, 0)
    text = "The model reads a corpus, ünïcödé and all."
    ids = Tokenize(tok)([text])[0]
    assert tok.decode(ids) == text and 0 not in ids


def test_tokenizer_training_is_deterministic():
    a = train_tokenizer(sentences(800, seed=1), vocab_size=500).to_str()
    b = train_tokenizer(sentences(800, seed=1), vocab_size=500).to_str()
    assert a == b
