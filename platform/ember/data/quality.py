"""Heuristic quality filters, a tokenize step: the Gopher quality and repetition rules and the C4 rules.

`QualityFilter` takes normalised documents and yields those that pass every enabled rule, counting each removed one in
the SkipLog as ``quality:<section>.<rule>``: the spec key (`filter.quality.<section>.<key>`) whose rule removed it,
an n-gram rule with its n (``gopher_repetition.top_2gram_chars``), or ``c4.no_lines_left``.
The rules run in the order of the FineWeb pipeline: Gopher repetition, Gopher quality, then C4, which may also rewrite
a document by dropping lines (its line rules); each section stops at the first rule a document breaks.

Tokens are whitespace-separated (no language-specific tokenizer); words are the tokens that are not punctuation
alone (a lone "-" or "..." is not one): the word-count and word-length rules count words, the symbol and alphabetic
ratios every token. Lines are non-blank lines. These follow datatrove's GopherQualityFilter,
GopherRepetitionFilter and C4QualityFilter, with three differences: a top n-gram must occur at least twice to count
(a short document of unique words is not "repetitive"), character fractions count the characters of words (not
whitespace), and C4's document rules (lorem ipsum, curly bracket) look at the whole document, as the C4 paper states.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import cached_property
from typing import Callable, Iterable, Iterator

from ember.config.specs import C4Spec, GopherRepetitionSpec, GopherSpec, QualitySpec
from ember.data.sources import SkipLog

_PUNCTUATION = string.punctuation + "…“”‘’«»–—•"
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "◦", "‣", "➤", "- ", "* ")
_ELLIPSES = ("...", "…")
_C4_END = (".", "?", "!", '"', "'")
_C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class DocumentStats:
    """The measures the rules read, each computed on first use (a document that fails an early rule costs little)."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def tokens(self) -> list[str]:
        return self.text.split()

    @cached_property
    def words(self) -> list[str]:
        """Tokens with a letter or a digit."""
        return [t for t in self.tokens if t.strip(_PUNCTUATION)]

    @cached_property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines() if line.strip()]

    @cached_property
    def n_words(self) -> int:
        return len(self.words)

    @cached_property
    def word_chars(self) -> int:
        return max(1, sum(len(w) for w in self.tokens))

    def per_word(self, count: int) -> float:
        return count / max(1, self.n_words)

    def per_token(self, count: int) -> float:
        """Over every whitespace-separated token, symbols included (Gopher's symbol and alphabetic ratios)."""
        return count / max(1, len(self.tokens))

    def per_line(self, count: int) -> float:
        return count / max(1, len(self.lines))

    @cached_property
    def mean_word_length(self) -> float:
        return sum(len(w) for w in self.words) / max(1, self.n_words)

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in _PARAGRAPH_BREAK.split(self.text) if p.strip()]

    @cached_property
    def repeated_lines(self) -> tuple[int, int]:
        return _repeats(self.lines)

    @cached_property
    def repeated_paragraphs(self) -> tuple[int, int]:
        return _repeats(self.paragraphs)

    @cached_property
    def lowered(self) -> list[str]:
        return [t.strip(_PUNCTUATION).lower() for t in self.tokens]


def _repeats(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier one, their characters)."""
    seen, count, chars = set(), 0, 0
    for item in items:
        if item in seen:
            count, chars = count + 1, chars + len(item)
        seen.add(item)
    return count, chars


def _top_ngram_chars(tokens: list[str], n: int) -> int:
    """Characters (of words) in all occurrences of the most frequent word n-gram, if it occurs more than once."""
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    if not counts:
        return 0
    gram, count = counts.most_common(1)[0]
    return sum(len(w) for w in gram) * count if count > 1 else 0


def _dup_ngram_chars(tokens: list[str], n: int) -> int:
    """Characters of the words covered by word n-grams that repeat an earlier n-gram (each word counted once)."""
    seen, covered = set(), bytearray(len(tokens))
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            covered[i:i + n] = b"\1" * n
        seen.add(gram)
    return sum(len(t) for t, c in zip(tokens, covered) if c)


Rule = tuple[str, Callable[[DocumentStats, float], bool]]  # (spec key, breaks(stats, threshold))

GOPHER_RULES: tuple[Rule, ...] = (
    ("min_doc_words", lambda s, t: s.n_words < t),
    ("max_doc_words", lambda s, t: s.n_words > t),
    ("min_mean_word_length", lambda s, t: s.mean_word_length < t),
    ("max_mean_word_length", lambda s, t: s.mean_word_length > t),
    ("max_symbol_word_ratio", lambda s, t: max(s.per_token(s.text.count("#")),
                                               s.per_token(sum(s.text.count(e) for e in _ELLIPSES))) > t),
    ("max_bullet_lines", lambda s, t: s.per_line(sum(line.startswith(_BULLETS) for line in s.lines)) > t),
    ("max_ellipsis_lines", lambda s, t: s.per_line(sum(line.endswith(_ELLIPSES) for line in s.lines)) > t),
    ("min_alpha_words", lambda s, t: s.per_token(sum(any(c.isalpha() for c in w) for w in s.tokens)) < t),
)


REPETITION_RULES: tuple[Rule, ...] = (
    ("max_dup_lines", lambda s, t: s.per_line(s.repeated_lines[0]) > t),
    ("max_dup_line_chars", lambda s, t: s.repeated_lines[1] / max(1, len(s.text)) > t),
    ("max_dup_paragraphs", lambda s, t: s.repeated_paragraphs[0] / max(1, len(s.paragraphs)) > t),
    ("max_dup_paragraph_chars", lambda s, t: s.repeated_paragraphs[1] / max(1, len(s.text)) > t),
)


def _first_broken(stats: DocumentStats, spec, rules: tuple[Rule, ...]) -> str | None:
    """The key of the first rule (whose threshold is not null) the document breaks."""
    for key, breaks in rules:
        threshold = getattr(spec, key)
        if threshold is not None and breaks(stats, threshold):
            return key
    return None


def gopher_reason(stats: DocumentStats, spec: GopherSpec) -> str | None:
    """The key of the first Gopher quality rule the document breaks, or None."""
    key = _first_broken(stats, spec, GOPHER_RULES)
    if key:
        return key
    if spec.min_stop_words is not None:
        stop = {w.lower() for w in spec.stop_words}
        if sum(w in stop for w in stats.lowered) < spec.min_stop_words:
            return "min_stop_words"
    return None


def repetition_reason(stats: DocumentStats, spec: GopherRepetitionSpec) -> str | None:
    """The key of the first Gopher repetition rule the document breaks, or None."""
    key = _first_broken(stats, spec, REPETITION_RULES)
    if key:
        return key
    for n, fraction in sorted(spec.top_ngram_chars.items()):
        if _top_ngram_chars(stats.tokens, n) / stats.word_chars > fraction:
            return f"top_{n}gram_chars"
    for n, fraction in sorted(spec.dup_ngram_chars.items()):
        if _dup_ngram_chars(stats.tokens, n) / stats.word_chars > fraction:
            return f"dup_{n}gram_chars"
    return None


def _c4_line_kept(line: str, spec: C4Spec) -> bool:
    lower = line.lower()
    words = line.split()
    return not (
        (spec.max_word_length is not None and any(len(w) > spec.max_word_length for w in words))
        or (spec.end_punctuation and (not line.endswith(_C4_END) or line.endswith("...")))
        or (spec.min_words_per_line is not None and len(words) < spec.min_words_per_line)
        or (spec.javascript and "javascript" in lower)
        or (spec.policy and any(p in lower for p in _C4_POLICY))
    )


def c4_apply(text: str, spec: C4Spec) -> tuple[str, str | None]:
    """(the document without the lines C4's line rules drop, the key of the document rule it breaks or None)."""
    if spec.lorem_ipsum and "lorem ipsum" in text.lower():
        return text, "lorem_ipsum"
    if spec.curly_bracket and "{" in text:
        return text, "curly_bracket"
    kept = [line for line in (raw.strip() for raw in text.splitlines()) if line and _c4_line_kept(line, spec)]
    if spec.min_sentences is not None and sum(len(_SENTENCE_END.findall(line)) for line in kept) < spec.min_sentences:
        return text, "min_sentences"
    if not kept:
        return text, "no_lines_left"
    return "\n".join(kept), None


class QualityFilter:
    """Step: documents → those that pass every enabled rule (C4's line rules applied), each removed one counted in
    `skips` as ``quality:<section>.<key>``, not as bad input."""

    def __init__(self, spec: QualitySpec, skips: SkipLog):
        self.spec, self.skips = spec, skips

    def check(self, text: str) -> tuple[str, str | None]:
        """(the document as kept, the reason it is removed or None)."""
        spec = self.spec
        stats = DocumentStats(text)
        if spec.gopher_repetition.enabled and (key := repetition_reason(stats, spec.gopher_repetition)):
            return text, f"quality:gopher_repetition.{key}"
        if spec.gopher.enabled and (key := gopher_reason(stats, spec.gopher)):
            return text, f"quality:gopher.{key}"
        if spec.c4.enabled:
            text, key = c4_apply(text, spec.c4)
            if key:
                return text, f"quality:c4.{key}"
        return text, None

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        for text in docs:
            text, reason = self.check(text)
            if reason:
                self.skips.skip(reason, "", bad_input=False)
            else:
                yield text
