"""The engine replica: `ray.serve.llm`'s `LLMServer` (vLLM) with the model dir, and the adapters, taken through
Ember's storage.

A model dir may be a path, a bucket URI or `builtin:NAME`; each replica's node pulls it into its node cache (or
imports the built-in model once per node) before vLLM starts on the local copy. LoRA adapters (`ember.serve.app`'s
`adapters`) are loaded the same way when a request first names one (`base:adapter`), through Ray Serve's model
multiplexing, as `ray.serve.llm` loads them from its `dynamic_lora_loading_path`. `stats()` gives the engine's
latest figures (`ember.serve.stats`) and the requests in flight.
"""

from __future__ import annotations

from typing import Optional

from ray import serve
from ray.serve.llm import LLMServer

from ember import storage
from ember.errors import EmberError
from ember.model.hf import local_model_dir


class EmberLLMServer(LLMServer):
    """One vLLM engine; `model_dir` and `adapters` are Ember paths or URIs (see the module docstring)."""

    async def __init__(self, llm_config, *, model_dir: str, adapters: Optional[dict[str, str]] = None,
                       adapter_prefix: Optional[str] = None, max_adapters: int = 8, **kwargs):
        # Where this replica's node keeps the model: vLLM reads only local files. The engine config that building
        # the deployment cached names the original location (a bucket URI that ray.serve.llm would try to mirror
        # with its own client): derived again from the local copy.
        llm_config.model_loading_config.model_source = str(local_model_dir(model_dir))
        llm_config._engine_config = None
        self._adapters = dict(adapters or {})
        self._adapter_prefix = adapter_prefix
        self._max_adapters = max_adapters
        await super().__init__(llm_config, **kwargs)

    def _init_multiplex_loader(self, model_downloader_cls=None):
        """Adapters come from Ember's storage (a run dir's `model/`, a bucket URI) into the node cache; at most
        `max_adapters` stay loaded per replica (least recently used go first)."""
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        async def load_adapter(model_id: str):
            name = model_id.partition(":")[2]
            path = adapter_path(self._adapters, self._adapter_prefix, name)
            if path is None:
                raise EmberError(f"no adapter {name!r} on this server")
            self._ids.setdefault(name, len(self._ids) + 1)  # vLLM's integer id of an adapter (0 is the base)
            return DiskMultiplexConfig(model_id=model_id, max_total_tokens=None, local_path=str(local_model_dir(path)),
                                       lora_assigned_int_id=self._ids[name])

        self._ids: dict[str, int] = {}

        self._load_model = serve.multiplexed(max_num_models_per_replica=max(1, self._max_adapters))(load_adapter)

    async def stats(self) -> dict:
        """The engine's figures (`ember.serve.stats`) and the requests it holds (running or waiting)."""
        from ember.serve.stats import snapshot

        client = getattr(self.engine, "_engine_client", None) if self.engine is not None else None
        unfinished = client.get_num_unfinished_requests() if client is not None else 0
        return {**snapshot(), "requests": unfinished}


def adapter_path(adapters: dict[str, str], prefix: Optional[str], name: str) -> Optional[str]:
    """Where adapter `name` is: listed by name, or a subfolder of the prefix that holds an adapter; None if
    neither."""
    if name in adapters:
        return adapters[name]
    if prefix is None or not name or "/" in name or name in (".", ".."):
        return None
    path = storage.join(prefix, name)
    return path if storage.is_file(storage.join(path, "adapter_config.json")) else None
