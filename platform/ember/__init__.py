"""Ember: a distributed data-and-training platform for large language models, built on Ray."""

__version__ = "0.1.0"
