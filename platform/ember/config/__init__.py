"""Typed job specs, YAML loading and `--set` overrides."""

from ember.config.loader import apply_overrides, load_spec, parse_spec
from ember.config.specs import SPEC_KINDS, SpecModel, TokenizeSpec

__all__ = ["SPEC_KINDS", "SpecModel", "TokenizeSpec", "apply_overrides", "load_spec", "parse_spec"]
