"""Built-in corpora: real documentation text, deterministic, with a stable held-out split for python-qa."""

from ember.data import builtin


def docs_corpus():
    return [d for p in range(builtin.num_parts(builtin.PYTHON_DOCS)) for d in builtin.python_docs(p)]


def qa(split):
    return [r for p in range(builtin.num_parts(builtin.PYTHON_QA)) for r in builtin.python_qa(p, split)]


def parsed_again(read, parts: range):
    """What `read(part)` gives for `parts` with every stdlib file parsed anew (the per-process cache cleared)."""
    builtin._entries.cache_clear()
    return [x for p in parts for x in read(p)]


def test_python_docs_is_a_few_megabytes_of_prose_in_a_fixed_order():
    first = docs_corpus()
    again = parsed_again(builtin.python_docs, range(3))
    assert again and [d.text for d in first[:len(again)]] == [d.text for d in again]
    size = sum(len(d.text) for d in first)
    assert 1_000_000 < size < 20_000_000
    names = [d.where for d in first]
    assert "builtin:python-docs:topic:assert" in names and "builtin:python-docs:json" in names
    page = next(d.text for d in first if d.where == "builtin:python-docs:json")
    assert "json.dumps(obj, *, skipkeys=False" in page and "Serialize ``obj`` to a JSON formatted ``str``" in page


def test_python_qa_pairs_have_a_stable_disjoint_held_out_split():
    train, test = qa("train"), qa("test")
    assert len(train) > 2000 and 50 < len(test) < len(train) / 5
    first_parts = [r for p in range(3) for r in builtin.python_qa(p, "test")]
    assert first_parts == test[:len(first_parts)]
    assert parsed_again(lambda p: builtin.python_qa(p, "test"), range(3)) == first_parts
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(builtin.qa_split(r["prompt"]) == "test" for r in test)
    dumps = [r for r in train + test if r["where"] == "builtin:python-qa:json.dumps"]
    assert dumps and dumps[0]["response"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert "json.dumps" in dumps[0]["prompt"]
