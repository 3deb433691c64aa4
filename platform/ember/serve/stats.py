"""What a replica's vLLM engine did, step by step, kept in the replica's process for `/health` and `ember status`.

`EngineStats` is a vLLM stat logger, registered as the plugin `ember` of the entry-point group
`vllm.stat_logger_plugins` (pyproject.toml), so every vLLM engine in a process with Ember installed records into it;
vLLM calls `record` after each engine step with that step's scheduler and iteration figures. Prometheus gets the
same figures from vLLM's own Ray stat logger (`ray_vllm_*`); this one only keeps the latest and the totals where the
replica can read them (`snapshot()`).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass
class EngineSnapshot:
    """One engine's latest scheduler figures and its totals since it started."""

    running: int = 0  # sequences in the latest step's batch
    waiting: int = 0  # sequences waiting for room in the batch (KV blocks, max_num_seqs)
    steps: int = 0  # engine steps recorded
    generated_tokens: int = 0  # tokens generated over all requests
    prompt_tokens: int = 0  # prompt tokens read
    kv_cache_usage: float = 0.0  # fraction of the KV cache's blocks in use
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found

    def as_dict(self) -> dict:
        hit_rate = self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else None
        return {**asdict(self), "prefix_cache_hit_rate": hit_rate}


_LOCK = threading.Lock()
_ENGINES: dict[int, EngineSnapshot] = {}


def snapshot() -> dict:
    """The figures of this process's engine (the sum over engines when there are several), or {} before any."""
    with _LOCK:
        engines = list(_ENGINES.values())
    if not engines:
        return {}
    total = EngineSnapshot()
    for e in engines:
        for name, value in asdict(e).items():
            setattr(total, name, getattr(total, name) + value)
    total.kv_cache_usage /= len(engines)
    return total.as_dict()


class EngineStats(StatLoggerBase):
    """vLLM calls `record` after each step of engine `engine_index` (see the module docstring)."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.engine_index = engine_index
        with _LOCK:
            _ENGINES[engine_index] = EngineSnapshot()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        with _LOCK:
            s = _ENGINES.setdefault(engine_idx, EngineSnapshot())
            if scheduler_stats is not None:
                s.running, s.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                s.kv_cache_usage = scheduler_stats.kv_cache_usage
                prefix = scheduler_stats.prefix_cache_stats
                if prefix is not None:
                    s.prefix_cache_queries += prefix.queries
                    s.prefix_cache_hits += prefix.hits
            if iteration_stats is not None:
                s.steps += 1
                s.generated_tokens += iteration_stats.num_generation_tokens
                s.prompt_tokens += iteration_stats.num_prompt_tokens

    def log_engine_initialized(self):
        pass
