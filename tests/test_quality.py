"""Quality filters (Gopher, Gopher repetition, C4) as a step, and near-dedup (MinHash-LSH) on the session's Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import merged
from ember.config import parse_spec
from ember.config.specs import C4Spec, QualitySpec
from ember.data.quality import QualityFilter, c4_apply
from ember.data.sources import SkipLog
from ember.errors import EmberError

GOOD_LINES = [
    "The river bends around the old mill before it reaches the quiet harbour town.",
    "Fishermen mend their nets on the pier while gulls circle above the morning tide.",
    "A narrow road climbs from the square to a chapel that overlooks the whole valley.",
    "Visitors often stop at the bakery to buy bread that is still warm from the oven.",
    "In winter the storms arrive from the west and the boats stay tied to their moorings.",
    "Children learn to swim in the shallow cove where the water is calm and clear.",
    "The library keeps letters written by sailors who left the town a century ago.",
    "Every summer a festival fills the streets with music, lanterns and long tables.",
    "Farmers bring cheese, apples and honey to the market held each Saturday morning.",
    "An old lighthouse still guides ships past the rocks that line the northern shore.",
    "Painters come for the light, which changes colour with the clouds over the bay.",
    "Most families have lived here for generations and know every path along the cliffs.",
]
GOOD = "\n".join(GOOD_LINES)
PARAGRAPHS = [f"{a}\n{b}" for a, b in zip(GOOD_LINES[::2], GOOD_LINES[1::2])]  # 6 of two lines
NO_STOP_WORDS = "\n".join([
    "Cats sleep on warm windowsills during quiet afternoons in spring.",
    "Dogs chase bright balls across green parks near busy roads.",
    "Birds build small nests high in tall oak trees every year.",
    "Bakers knead soft dough before dawn in tiny kitchens downtown.",
    "Sailors read old charts by lamplight while storms pass overhead.",
    "Gardeners plant tulips in neat rows beside stone walls each autumn.",
])
SHORT_WORDS = "\n".join(["We go to it and so do I as he is by me on a ox."] * 5)
LONG_WORDS = "\n".join(["The internationalization of telecommunications infrastructure characteristically "
                        "necessitates extraordinarily comprehensive standardization."] * 6)
NGRAMS_ONLY = {"top_ngram_chars": {}, "dup_ngram_chars": {}}
# (section, key, a document that breaks that rule and no other rule of the section, the section's settings besides
# `enabled` (other rules off where one document cannot break this rule alone), the setting that turns the rule off)
CASES = [
    ("gopher", "min_doc_words", "\n".join(GOOD_LINES[:3]), {}, {"min_doc_words": None}),
    ("gopher", "min_mean_word_length", SHORT_WORDS, {}, {"min_mean_word_length": None}),
    ("gopher", "max_mean_word_length", LONG_WORDS, {}, {"max_mean_word_length": None}),
    ("gopher", "max_symbol_word_ratio", GOOD + "\n" + " ".join(f"#tag{i}" for i in range(20)), {},
     {"max_symbol_word_ratio": None}),
    ("gopher", "max_bullet_lines", "\n".join("• " + line for line in GOOD_LINES), {}, {"max_bullet_lines": None}),
    ("gopher", "max_ellipsis_lines", "\n".join(line[:-1] + ("..." if i < 4 else ".") for i, line in
                                               enumerate(GOOD_LINES)), {}, {"max_ellipsis_lines": None}),
    ("gopher", "min_alpha_words", GOOD + "\n" + " ".join(str(10 + i) for i in range(50)), {},
     {"min_alpha_words": None}),
    ("gopher", "min_alpha_words", GOOD + "\n" + " ".join(["|", "=", "+", ">>", "::"] * 60), {},  # symbols count
     {"min_alpha_words": None}),
    ("gopher", "min_stop_words", NO_STOP_WORDS, {}, {"min_stop_words": None}),
    ("gopher_repetition", "max_dup_lines", "\n".join(x for line in GOOD_LINES[:8] for x in (line, "Yes.")), {},
     {"max_dup_lines": None}),
    ("gopher_repetition", "max_dup_line_chars", "\n".join(GOOD_LINES + GOOD_LINES[:4]),
     {**NGRAMS_ONLY, "max_dup_paragraphs": None}, {"max_dup_line_chars": None}),
    ("gopher_repetition", "max_dup_paragraphs",
     "\n\n".join(PARAGRAPHS + ["Yes."] * 5), {},
     {"max_dup_paragraphs": None}),
    ("gopher_repetition", "max_dup_paragraph_chars",
     "\n\n".join(PARAGRAPHS + PARAGRAPHS[:2]),
     {**NGRAMS_ONLY, "max_dup_lines": None, "max_dup_line_chars": None}, {"max_dup_paragraph_chars": None}),
    ("gopher_repetition", "top_2gram_chars", "\n".join(f"{line[:-1]} extraordinary circumstances." for line in
                                                       GOOD_LINES), {}, {"top_ngram_chars": {3: 0.18, 4: 0.16}}),
    ("gopher_repetition", "dup_5gram_chars", "\n".join(GOOD_LINES + GOOD_LINES[:3]), {"dup_ngram_chars": {5: 0.15}},
     {"dup_ngram_chars": {}}),
    ("c4", "lorem_ipsum", GOOD + "\nLorem ipsum dolor sit amet, consectetur.", {}, {"lorem_ipsum": False}),
    ("c4", "curly_bracket", GOOD + "\nA dict such as {1: 2} maps keys to values.", {}, {"curly_bracket": False}),
    ("c4", "min_sentences", "\n".join(GOOD_LINES[:4]), {}, {"min_sentences": None}),
]


def check(text: str, **sections) -> str | None:
    """The reason `text` is removed under these rule sets (None: kept)."""
    return QualityFilter(QualitySpec(**sections), SkipLog()).check(text)[1]


ALL_ON = {"gopher": {"enabled": True}, "gopher_repetition": {"enabled": True}, "c4": {"enabled": True}}


def test_a_good_document_passes_every_rule_and_nothing_is_filtered_by_default():
    assert check(GOOD, **ALL_ON) is None
    assert not QualitySpec().enabled()
    assert all(check(text) is None for _, _, text, _, _ in CASES)  # every rule set is off by default


@pytest.mark.parametrize("section,key,text,settings,off", CASES,
                         ids=[f"{c[0]}.{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_removes_the_document_that_breaks_it_and_lets_it_through_when_off(section, key, text, settings,
                                                                                   off):
    assert check(text, **{section: {"enabled": True, **settings}}) == f"quality:{section}.{key}"
    assert check(text, **{section: {"enabled": True, **settings, **off}}) is None


def test_a_changed_threshold_changes_the_decision():
    assert check(GOOD, gopher={"enabled": True, "max_doc_words": 100}) == "quality:gopher.max_doc_words"
    assert check(GOOD, gopher={"enabled": True, "min_doc_words": 200}) == "quality:gopher.min_doc_words"
    assert check(GOOD, gopher={"enabled": True, "min_stop_words": 1000}) == "quality:gopher.min_stop_words"
    three = "\n".join(GOOD_LINES[:3])
    assert check(three, c4={"enabled": True}) == "quality:c4.min_sentences"
    assert check(three, c4={"enabled": True, "min_sentences": 3}) is None
    few_yes = "\n".join(x for line in GOOD_LINES[:8] for x in (line, "Yes."))
    assert check(few_yes, gopher_repetition={"enabled": True, "max_dup_lines": 0.5}) is None


def test_c4_line_rules_drop_lines_and_keep_the_document():
    lines = {"no_end": "This line has no terminal punctuation at all",
             "few_words": "Too short.",
             "javascript": "Please enable JavaScript to view this page properly.",
             "policy": "By using this site you agree to our privacy policy and rules.",
             "long_word": "A word like " + "x" * 1001 + " is not prose."}
    text = "\n".join([*GOOD_LINES[:6], *lines.values()])
    kept, reason = c4_apply(text, C4Spec(enabled=True))
    assert reason is None and kept == "\n".join(GOOD_LINES[:6])
    for key, line in (("end_punctuation", lines["no_end"]), ("min_words_per_line", lines["few_words"]),
                      ("javascript", lines["javascript"]), ("policy", lines["policy"]),
                      ("max_word_length", lines["long_word"])):
        off = None if key in ("min_words_per_line", "max_word_length") else False
        kept, _ = c4_apply(text, C4Spec(enabled=True, **{key: off}))
        assert line in kept.splitlines(), key


def test_removed_documents_are_counted_by_rule_not_as_bad_input():
    skips = SkipLog(strict=True)  # strict fails on bad input only: a quality removal is not one
    kept = list(QualityFilter(QualitySpec(**ALL_ON), skips)([GOOD, NO_STOP_WORDS, "\n".join(GOOD_LINES[:3]), GOOD]))
    assert kept == [GOOD, GOOD]
    assert skips.skipped == {"quality:gopher.min_stop_words": 1, "quality:gopher.min_doc_words": 1}
    assert skips.examples == []


@pytest.mark.parametrize("section,error", [
    ({"near_dedup": {"bands": 10}}, r"filter\.near_dedup.*bands × rows \(10 × 8 = 80\) must equal num_perm \(128\)"),
    ({"quality": {"gopher": {"max_symbol_word_ratio": -0.1}}}, r"filter\.quality\.gopher\.max_symbol_word_ratio"),
    ({"quality": {"gopher_repetition": {"top_ngram_chars": {2: -1}}}},
     r"filter\.quality\.gopher_repetition\.top_ngram_chars.*between 0 and 1"),
    ({"quality": {"c4": {"min_sentences": -5}}}, r"filter\.quality\.c4\.min_sentences"),
    ({"quality": {"gopher": {"min_doc_word": 5}}}, r"unknown key 'filter\.quality\.gopher\.min_doc_word'"),
])
def test_bad_filter_settings_are_refused_naming_the_key(section, error):
    spec = {"kind": "tokenize", "source": {"inputs": ["builtin:python-docs"]}, "output": {"dir": "/tmp/x"}}
    with pytest.raises(EmberError, match=error):
        parse_spec(merged(spec, filter=section))


def test_unset_filters_leave_the_dataset_identity_as_before_and_set_ones_are_in_it():
    from ember.data.pipeline import CorpusJob

    def parts(**filter_spec):
        spec = {"kind": "tokenize", "source": {"inputs": ["builtin:python-docs"]}, "output": {"dir": "/tmp/x"},
                "filter": filter_spec}
        return CorpusJob(parse_spec(spec)).identity_parts()["spec"]["filter"]

    assert parts() == {"normalize": "nfc", "min_chars": 16, "dedup": False}
    assert parts(near_dedup={"enabled": True, "bands": 32, "rows": 4})["near_dedup"]["bands"] == 32
    assert parts(quality={"c4": {"enabled": True}})["quality"]["c4"]["enabled"] is True
    assert parts(quality={"c4": {"enabled": True, "min_sentences": 3}}) != parts(quality={"c4": {"enabled": True}})


# ---------------------------------------------------------------- near-dedup on Ray


def near_copy_corpus(tmp_path):
    """24 distinct documents of 50 words or more and 3 shorter ones, then near copies of three: one with a word
    changed, one with its whitespace changed, one exact. Returns (the JSONL file, all documents, the copies'
    positions)."""
    from conftest import sentences

    pool = sentences(90, seed=7)
    docs = [d for d in pool if len(d.split()) >= 50][:24] + [d for d in pool if len(d.split()) < 40][:3]
    words = docs[3].split()
    extra = [" ".join(words[:20] + ["lighthouse"] + words[21:]),  # a word changed
             "  \n".join(docs[10].split(" ")),  # whitespace changed
             docs[17]]  # an exact copy
    path = tmp_path / "near.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + extra))
    return path, docs + extra, [len(docs), len(docs) + 1, len(docs) + 2]


def spec_for(path, out, **filters):
    return parse_spec({"kind": "tokenize", "source": {"inputs": [str(path)], "unit_bytes": 4096},
                       "tokenizer": {"vocab_size": 400, "sample_bytes": 100_000},
                       "pack": {"seq_len": 16, "val_fraction": 0.0}, "filter": filters, "output": {"dir": str(out)},
                       "workers": 2})


def test_near_copies_are_found_and_the_first_kept_whatever_the_partition_count(ray_session, tmp_path):
    from ember.data.dedup import Signatures, near_duplicates
    from ember.data.pipeline import dedup_documents
    from ember.data.sources import plan_units, resolve_inputs

    path, docs, copies = near_copy_corpus(tmp_path)
    spec = spec_for(path, tmp_path / "out", near_dedup={"enabled": True})
    units = plan_units(resolve_inputs(spec.source), spec.source)
    assert len(units) > 2  # the copies are in other units than their originals
    signatures = Signatures(spec.filter.near_dedup)
    keys = [signatures(dedup_documents(spec, u)) for u in units]
    offsets = np.cumsum([0] + [len(k) for k in keys])
    assert offsets[-1] == len(docs)
    found = near_duplicates(keys, partitions=3)  # the tokenize run below groups over 2, with the same result
    dropped = sorted(int(offsets[i]) + p for i, positions in enumerate(found) for p in positions)
    assert dropped == copies  # the copies, never their originals (which come first), and nothing else


def test_a_tokenize_run_removes_near_copies_and_counts_each_step(ray_session, tmp_path):
    from ember.data.pipeline import _summary_lines, run_tokenize

    path, docs, _ = near_copy_corpus(tmp_path)
    gopher = {"enabled": True, "min_doc_words": 40}
    manifest = run_tokenize(spec_for(path, tmp_path / "out", dedup=True, near_dedup={"enabled": True},
                                     quality={"gopher": gopher}))
    counts = manifest["documents"]
    assert counts["skipped"] == {"duplicate": 1, "near_duplicate": 2, "quality:gopher.min_doc_words": 3}
    assert counts["kept"] == len(docs) - 6 and counts["read"] == len(docs) and counts["examples"] == []
    lines = _summary_lines(manifest, None, 0)
    assert lines[0].endswith("kept, skipped: duplicate 1, near_duplicate 2")
    assert lines[1] == "  removed by the quality filters: 3 (gopher.min_doc_words 3)"


def test_a_dropped_position_whose_document_changed_fails_the_unit(tmp_path):
    """The dedup passes drop documents by position within their unit, with each one's hash: a unit whose document
    at that position is another one now (an input changed between the passes) fails instead of dropping it."""
    from ember.config import parse_spec
    from ember.data.pipeline import unit_documents
    from ember.data.sources import plan_units, resolve_inputs
    from ember.data.steps import doc_hash
    from ember.errors import EmberError

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in GOOD_LINES[:3]))
    spec = parse_spec({"kind": "tokenize", "source": {"inputs": [str(path)]}, "output": {"dir": str(tmp_path / "o")}})
    [unit] = plan_units(resolve_inputs(spec.source), spec.source)
    docs = list(unit_documents(unit, spec, SkipLog()))
    skips = SkipLog()
    assert list(unit_documents(unit, spec, skips, {1: ["duplicate", doc_hash(docs[1])]})) == [docs[0], docs[2]]
    assert skips.skipped == {"duplicate": 1}
    with pytest.raises(EmberError, match=r"work unit 0 \(.*a.jsonl, ...\): its document 1 is not the one the dedup "
                                         "pass read"):
        list(unit_documents(unit, spec, SkipLog(), {1: ["duplicate", doc_hash(docs[1]) ^ 1]}))
