"""Built-in corpora generated on the fly from the running Python's own documentation.

``builtin:python-docs`` is a pretraining corpus: the ``pydoc_data`` topics (the language reference pages behind
``help()``) and, per standard-library module, its docstrings laid out like a ``pydoc`` page. ``builtin:python-qa`` is an
instruction corpus derived from the same docstrings: a question naming a module, class or function, answered by its
docstring's summary; a stable hash of the question holds some out (its ``test`` split). ``builtin:python-prefs`` is
python-qa as preference pairs: each question with its own answer as chosen and, as rejected, a plausible wrong one,
the summary of another entry of the same module (source file), chosen by a stable hash of the question among that
module's held-in answers, so no held-out answer appears in training in either role; questions whose module has no
other answer are left out. All are deterministic for a given Python build (sorted files, sorted topics, no imports of
the modules themselves, so nothing is executed), and need no download.

The corpora are split into *parts* so that Ray can read them in parallel: part 0 of ``python-docs`` is the topics,
every other part is a contiguous group of source files (a module's questions and their wrong answers are in one part).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from ember.identity import identity_of

PYTHON_DOCS = "python-docs"
PYTHON_QA = "python-qa"
PYTHON_PREFS = "python-prefs"
QA_SPLITS = ("train", "test")
QA_TEST_PERCENT = 5  # share of python-qa held out for evaluation, chosen by a stable hash of the question
FILES_PER_PART = 48  # source files per work unit: small enough to spread over workers, big enough to be worth a task

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


@dataclass(frozen=True)
class BuiltinDoc:
    """One document of a built-in corpus and where it came from (shown in skip reports)."""

    text: str
    where: str


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Paths (relative to the stdlib root) of the standard library's Python sources, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return tuple(sorted(found))


@lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """Identifies the corpus content: the Python build and its source file list with sizes."""
    root = sysconfig.get_paths()["stdlib"]
    return identity_of([sys.version, [[rel, os.path.getsize(os.path.join(root, rel))] for rel in stdlib_files()]])


def num_parts(corpus: str) -> int:
    """How many independently readable parts a built-in corpus has."""
    module_parts = -(-len(stdlib_files()) // FILES_PER_PART)
    return 1 + module_parts if corpus == PYTHON_DOCS else module_parts


def _module_name(rel: str) -> str:
    name = rel[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _parse(rel: str) -> ast.Module | None:
    path = os.path.join(sysconfig.get_paths()["stdlib"], rel)
    try:
        with open(path, "rb") as f:
            return ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, OSError):  # a few stdlib files are templates or target other versions
        return None


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"({ast.unparse(node.args)})"


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, str, str]]:
    """Yields (kind, dotted name with signature, docstring) for the module, its classes, functions and methods."""
    doc = ast.get_docstring(tree)
    if doc:
        yield "module", module, doc
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                yield "function", f"{module}.{node.name}{_signature(node)}", doc
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                yield "class", f"{module}.{node.name}", doc
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    doc = ast.get_docstring(item)
                    if doc:
                        yield "method", f"{module}.{node.name}.{item.name}{_signature(item)}", doc


@lru_cache(maxsize=None)
def _entries(rel: str) -> tuple[tuple[str, str, str], ...]:
    """The documented names of one stdlib file (see `_documented`; none when it does not parse). Both corpora read
    them, and a process reading a corpus again (a job's second split, an evaluation after a fine-tune) parses each
    file once: a few MB of docstrings instead of a second pass over the standard library's syntax trees."""
    tree = _parse(rel)
    return () if tree is None else tuple(_documented(tree, _module_name(rel)))


def _part_files(part: int) -> tuple[str, ...]:
    return stdlib_files()[part * FILES_PER_PART : (part + 1) * FILES_PER_PART]


def python_docs(part: int) -> Iterator[BuiltinDoc]:
    """The documents of one part of ``builtin:python-docs``: topic pages (part 0) or module pages."""
    if part == 0:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield BuiltinDoc(f"{name}\n\n{topics[name].strip()}", f"builtin:python-docs:topic:{name}")
        return
    for rel in _part_files(part - 1):
        module = _module_name(rel)
        sections = [f"Module {name}\n\n{doc}" if kind == "module" else f"{name}\n\n{doc}"
                    for kind, name, doc in _entries(rel)]
        if sections:
            yield BuiltinDoc("\n\n".join(sections), f"builtin:python-docs:{module}")


def _summary(doc: str) -> str:
    """A docstring's first paragraph, joined into one line."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def _question(kind: str, name: str) -> str:
    short = name.split("(", 1)[0]
    variant = hashlib.blake2b(name.encode(), digest_size=1).digest()[0] % 3
    if kind == "module":
        return ("What is the Python module `{0}` for?", "Describe the `{0}` module.", "What does `{0}` provide?")[
            variant
        ].format(short)
    what = {"function": "function", "method": "method", "class": "class"}[kind]
    return (
        f"What does the {what} `{short}` do?",
        f"In Python, what is `{short}` for?",
        f"Explain the {what} `{name}` briefly.",
    )[variant]


def qa_split(prompt: str) -> str:
    """The split ('train' or 'test') a question belongs to, fixed by a stable hash of its text."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=4).digest(), "little") % 100
    return "test" if bucket < QA_TEST_PERCENT else "train"


def _check_split(corpus: str, split: str) -> None:
    if split not in QA_SPLITS:
        raise ValueError(f"unknown {corpus} split {split!r} (one of: {', '.join(QA_SPLITS)})")


def _questions(rel: str) -> list[tuple[str, str, str]]:
    """(question, answer, name) of each usable documented entry of one stdlib file, of both splits, in order."""
    found = []
    for kind, name, doc in _entries(rel):
        answer = _summary(doc)
        if len(answer) >= 20:  # one-word summaries teach nothing
            found.append((_question(kind, name), answer, name.split("(", 1)[0]))
    return found


def python_qa(part: int, split: str = "train") -> Iterator[dict]:
    """The records of one part of ``builtin:python-qa``: ``{"prompt", "response", "where"}``, of one split."""
    _check_split(PYTHON_QA, split)
    for rel in _part_files(part):
        for prompt, answer, name in _questions(rel):
            if qa_split(prompt) == split:
                yield {"prompt": prompt, "response": answer, "where": f"builtin:python-qa:{name}"}


def python_prefs(part: int, split: str = "train") -> Iterator[dict]:
    """The records of one part of ``builtin:python-prefs``: ``{"prompt", "chosen", "rejected", "where"}``, of one
    split: each python-qa question of the split with its answer as chosen and, as rejected, another held-in answer of
    its module, picked by a stable hash of the question; questions whose module has none are left out."""
    _check_split(PYTHON_PREFS, split)
    for rel in _part_files(part):
        questions = _questions(rel)
        held_in = list(dict.fromkeys(answer for prompt, answer, _ in questions if qa_split(prompt) == "train"))
        for prompt, answer, name in questions:
            wrong = [a for a in held_in if a != answer]
            if qa_split(prompt) != split or not wrong:
                continue
            pick = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=4).digest(), "little") % len(wrong)
            yield {"prompt": prompt, "chosen": answer, "rejected": wrong[pick],
                   "where": f"builtin:python-prefs:{name}"}


def python_qa_choices(split: str = "test", choices: int = 4) -> list[dict]:
    """``builtin:python-qa`` as a multiple-choice task: each question with its own answer and `choices - 1` other
    answers of the same split as distractors, the right one at a position of its own; all fixed by a stable hash of
    the question. ``{"question", "choices", "label", "where"}`` per question, in the corpus's order."""
    import random

    records = [r for part in range(num_parts(PYTHON_QA)) for r in python_qa(part, split)]
    answers = sorted({r["response"] for r in records})
    docs = []
    for r in records:
        rng = random.Random(hashlib.blake2b(r["prompt"].encode(), digest_size=8).digest())
        others = rng.sample([a for a in answers if a != r["response"]], choices - 1)
        label = rng.randrange(choices)
        docs.append({"question": r["prompt"], "choices": others[:label] + [r["response"]] + others[label:],
                     "label": label, "where": r["where"]})
    return docs
