"""The READMEs' commands against the code, so the docs cannot drift: every `ember` command in a shell block parses
with the real CLI, the files it names exist, the specs it names load with its --set overrides, every `make` target
exists, and the cheap commands run here. The expensive ones run for real elsewhere: `ember demo` in test_demo.py,
`ember cluster`/`submit`/`jobs`/`status`/`serve --detach` in test_cluster.py."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO, run_ember

DOCS = ["README.md", "cluster/README.md", "serve/README.md", "benchmarks/README.md"]


def shell_commands(doc: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments and prompts dropped."""
    text = (REPO / doc).read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                commands += [part.strip() for part in re.split(r"\s(?:&&|\|\|)\s|;\s", line) if part.strip()]
    return commands


def ember_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for command in shell_commands(doc):
            words = shlex.split(command.rstrip("&").strip())
            for i, word in enumerate(words):
                if word.endswith("ember") and (word == "ember" or word.endswith("/ember")):
                    found.append((doc, words[i + 1:]))
                    break
    return found


def test_the_readme_leads_with_the_two_commands():
    lines = (REPO / "README.md").read_text().split("## ")[0]
    assert "make demo" in lines and "make test" in lines
    targets = set(re.findall(r"^([a-z]+):", (REPO / "Makefile").read_text(), flags=re.M))
    for doc in DOCS:
        for command in shell_commands(doc):
            if command.startswith("make "):
                assert command.split()[1] in targets, (doc, command)


@pytest.mark.parametrize("doc,args", ember_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_every_ember_command_in_the_docs_parses_and_names_real_files(doc, args):
    from ember.cli import _parser
    from ember.config import load_spec

    parsed = _parser().parse_args(args)  # argparse exits (fails the test) on a verb or option that does not exist
    for word in args:
        if re.match(r"^(jobs|serve|cluster)/[\w./-]+\.ya?ml$", word):
            assert (REPO / word).is_file(), f"{doc}: {word} does not exist"
    if parsed.verb in ("run", "submit"):
        overrides = [o for o in parsed.overrides if "=" in o]
        spec = load_spec(REPO / parsed.spec, overrides)
        assert spec.kind


def test_the_docs_mention_every_verb_and_the_cheap_ones_run():
    verbs = {args[0] for _, args in ember_commands() if args}
    assert {"run", "submit", "jobs", "status", "cluster", "serve", "generate", "demo", "report", "import"} <= verbs
    for verb in sorted(verbs):
        result = run_ember(verb, "--help", timeout=60)
        assert result.returncode == 0 and "usage: ember" in result.stdout, verb
