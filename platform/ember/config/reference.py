"""The spec reference (docs/specs.md), generated from the pydantic models so that it cannot drift from the code.

    python -m ember.config.reference > docs/specs.md
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ember.config.specs import SPEC_KINDS


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def _nested(annotation) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def key_rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One Markdown table row per key of a model (nested models as dotted keys): key, type, default, description."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        nested = _nested(field.annotation)
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "(section)" if nested else repr(field.default_factory())
        else:
            default = "—" if field.default is PydanticUndefined else f"`{field.default!r}`"
        kind = "section" if nested else _type_name(field.annotation)
        rows.append(f"| `{key}` | {kind} | {default} | {field.description or ''} |")
        if nested:
            rows.extend(key_rows(nested, f"{key}."))
    return rows


def render_reference() -> str:
    parts = ["# Spec reference", "",
             "Generated from `platform/ember/config/specs.py` by `python -m ember.config.reference`; a test keeps it "
             "current. Override any key on the command line with `--set key=value` (values are read as YAML).", ""]
    for kind, model in SPEC_KINDS.items():
        parts += [f"## kind: {kind}", "", (model.__doc__ or "").strip(), "",
                  "| key | type | default | description |", "|---|---|---|---|", *key_rows(model), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_reference(), end="")
