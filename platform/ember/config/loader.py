"""Loading specs from YAML with `--set a.b=c` overrides, and turning validation failures into clear messages.

Each message names the file, the line (when the key is in the file) or the override, the dotted field, and what is
wrong with it; an unknown key gets a "did you mean" hint from the keys that are allowed at that place.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from ember.config.specs import CREDENTIALS_ERROR, SPEC_KINDS, SpecModel, strings_in
from ember.errors import EmberError
from ember.storage import secret_options


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Maps each dotted key path in a composed YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (key.value,)
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            lines.update(_key_lines(item, prefix + (i,)))
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` → (["a", "b"], c), with c read as YAML so that numbers, booleans and lists keep their type."""
    if "=" not in text:
        raise EmberError(f"--set {text}: expected KEY=VALUE, for example --set pack.seq_len=256")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise EmberError(f"--set {text}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw  # not YAML: keep the plain string
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict[tuple, str]:
    """Applies `a.b=c` overrides to nested dicts in place; returns which paths each override set."""
    origins: dict[tuple, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise EmberError(f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
        # Named by its key alone when its value carries credentials (refused by the spec; never shown).
        origins[tuple(parts)] = f"--set {'.'.join(parts)}=…" if secret_options(text) else f"--set {text}"
    return origins


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The spec section class at a location, following nested models through Optional/list annotations."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _describe(err: dict, model: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = sorted(f.alias or name for name, f in parent.model_fields.items()) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        text = f"unknown key '{dotted}'"
        if hint:
            text += f" (did you mean '{'.'.join(str(p) for p in loc[:-1] + (hint[0],))}'?)"
        elif allowed:
            text += f" (allowed here: {', '.join(allowed)})"
        return text
    if err["type"] == "missing":
        return f"{dotted}: required key is missing"
    got = err.get("input")
    if err["type"] == CREDENTIALS_ERROR:  # the value holds a secret: never shown
        return f"{dotted}: {err['msg']}"
    if err["type"] == "value_error" and isinstance(got, dict):  # a check across a section's keys: its text says all
        return f"{dotted}: {err['msg'].removeprefix('Value error, ')}"
    if any(secret_options(text) for text in strings_in(got)):
        return f"{dotted}: {err['msg']} (the value is not shown: it holds credentials)"
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"{dotted}: {err['msg']} (got {shown})"


def _where(origin: str, loc: tuple, lines: dict[tuple, int], overrides: dict[tuple, str]) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in overrides:
            return overrides[loc[:n]]
        if loc[:n] in lines:
            return f"{origin}:{lines[loc[:n]]}"
    return origin


def parse_spec(
    data: Any, origin: str = "<spec>", lines: dict | None = None, overrides: dict | None = None
) -> SpecModel:
    """Validates a spec given as a dict, choosing the model by its `kind`; raises EmberError naming each bad field."""
    lines, overrides = lines or {}, overrides or {}
    if not isinstance(data, dict):
        raise EmberError(f"{origin}: a spec must be a mapping of keys to values, got {type(data).__name__}")
    kind = data.get("kind")
    if kind is None:
        raise EmberError(f"{origin}: missing 'kind' (one of: {', '.join(SPEC_KINDS)})")
    if kind not in SPEC_KINDS:
        hint = difflib.get_close_matches(str(kind), list(SPEC_KINDS), n=1)
        did = f"did you mean '{hint[0]}'? " if hint else ""
        raise EmberError(
            f"{_where(origin, ('kind',), lines, overrides)}: unknown kind {kind!r} "
            f"({did}known: {', '.join(SPEC_KINDS)})"
        )
    model = SPEC_KINDS[kind]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        described = [(e, _describe(e, model)) for e in errors]
        # "unknown key 'a.inputz' (did you mean 'a.inputs'?)" already explains why 'a.inputs' is missing.
        hinted = {text.split("did you mean '")[1].split("'")[0] for _, text in described if "did you mean" in text}
        problems = [f"{_where(origin, tuple(e['loc']), lines, overrides)}: {text}" for e, text in described
                    if not (e["type"] == "missing" and ".".join(map(str, e["loc"])) in hinted)]
        raise EmberError("; ".join(problems)) from None


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> SpecModel:
    """Reads a YAML spec file, applies `--set` overrides and validates it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise EmberError(f"spec file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EmberError(f"cannot read spec file {path}: {exc}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise EmberError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        raise EmberError(f"{path}: the spec file is empty")
    if not isinstance(data, dict):
        raise EmberError(f"{path}: a spec must be a mapping of keys to values, got {type(data).__name__}")
    origins = apply_overrides(data, overrides)
    return parse_spec(data, str(path), _key_lines(node) if node else {}, origins)
