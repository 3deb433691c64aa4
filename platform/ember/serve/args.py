"""The args of Ember's serving app (`ember.serve.app:build_app`): what a serve spec or a Ray Serve config's
application `args` may say, each key with its bound and description. The app builder and the ingress both read them;
this module imports neither."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from ember.config.specs import SpecModel
from ember.connection import LOOPBACK
from ember.serve.guard import key_digest, read_api_keys
from ember.serve.protocol import MAX_N

PROMPT_CHARS_PER_TOKEN = 16  # max_prompt_chars's default per context token: 4 × the context at 4 characters a token


class AutoscalingArgs(SpecModel):
    """Ray Serve autoscaling of the engine replicas."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, description="Replicas at most.")
    target_ongoing_requests: float = Field(8, gt=0, description="Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5, ge=0, description="Seconds of high load before adding replicas.")
    downscale_delay_s: float = Field(30, ge=0, description="Seconds of low load before removing replicas.")


class ServeArgs(SpecModel):
    """The `args` of `ember.serve.app:build_app` (a Ray Serve config's application args)."""

    model_dir: str = Field(description="The model dir to serve (Llama, Qwen2, Qwen3 or Mistral): a path, a URI of "
                                       "object storage that each replica's node pulls into its node cache, or "
                                       "builtin:NAME.")
    model_name: Optional[str] = Field(None, description="The model id clients send (default: the dir's name).")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters served on the base without "
                                                                       "merging, name -> adapter dir (a run's "
                                                                       "model/ or a URI); clients ask for "
                                                                       "`<model id>:<name>`.")
    adapter_prefix: Optional[str] = Field(None, description="A dir or URI whose subfolders are adapters, loaded when "
                                                            "a request first names one (`<model id>:<subfolder>`).")
    max_adapters: int = Field(8, ge=1, description="Adapters loaded at once per replica (vLLM's max_loras; the least "
                                                   "recently used is unloaded).")
    max_lora_rank: int = Field(16, ge=1, description="The largest adapter rank served (vLLM's max_lora_rank).")
    max_num_seqs: int = Field(16, ge=1, description="Sequences one replica decodes together (vLLM's max_num_seqs).")
    max_ongoing_requests: Optional[int] = Field(None, ge=1, description="Requests one replica holds, running or "
                                                                        "waiting in vLLM (default: 2 × "
                                                                        "max_num_seqs).")
    max_queue: int = Field(64, ge=1, description="Requests each ingress replica keeps waiting for an engine replica "
                                                 "while every one holds max_ongoing_requests; beyond it: 503 "
                                                 "(Serve's max_queued_requests).")
    max_num_batched_tokens: Optional[int] = Field(None, ge=1, description="Tokens one engine step reads at most; "
                                                                          "longer prompts are read in chunks (default: "
                                                                          "vLLM's).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a chat request gives none.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413 (read as a stream and "
                                                              "refused as soon as they pass it).")
    body_timeout_s: float = Field(30, gt=0, description="Seconds a client has to send its whole request body; a "
                                                        "slower one gets 408, so a stalled client frees its slot.")
    max_prompt_chars: Optional[int] = Field(None, ge=1, description="Characters of one prompt at most (each text of "
                                                                    "a completions request, a chat's messages "
                                                                    "together), refused with 400 before tokenizing "
                                                                    "(default: 16 × max_model_len).")
    max_n: int = Field(16, ge=1, le=MAX_N, description="Choices per prompt (`n`) at most.")
    max_choices: int = Field(64, ge=1, description="Choices of one request (prompts × n) at most.")
    max_model_len: Optional[int] = Field(None, ge=2, description="Prompt + output tokens of one request at most "
                                                                 "(default: the model's context).")
    kv_cache_memory_gb: Optional[float] = Field(4.0, gt=0, description="Memory for the KV cache per replica (GiB; "
                                                                       "vLLM's kv_cache_memory_bytes), on CPU and "
                                                                       "GPU; null on a GPU to size it by "
                                                                       "gpu_memory_utilization instead.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="The share of each GPU's memory vLLM may "
                                                                       "take when kv_cache_memory_gb is null.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV blocks of prompt prefixes across requests "
                                                          "(vLLM's automatic prefix caching; see "
                                                          "prefix_cache_per_key).")
    prefix_cache_per_key: bool = Field(True, description="Requests share cached prompt blocks only with requests of "
                                                         "the same API key (a cache_salt derived from the key's "
                                                         "digest, before the client's own), so cached_tokens and "
                                                         "timings tell nothing of other keys' prompts.")
    sanitize_control_tokens: bool = Field(True, description="Special-token text inside a chat message (a turn "
                                                            "marker, say) is encoded as plain text, so only the chat "
                                                            "template writes control tokens (transformers' "
                                                            "sanitize_control_tokens).")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="Weights dtype (default: bfloat16 with num_gpus, float32 on CPU).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Further vLLM engine arguments "
                                                                            "(AsyncEngineArgs names, e.g. "
                                                                            "quantization, "
                                                                            "speculative_config); unknown "
                                                                            "names are refused.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the engine replicas (vLLM's "
                                                                       "VLLM_* settings, HF_HOME, NCCL_*, ...).")
    api_keys_env: Optional[str] = Field("EMBER_API_KEYS", description="Environment variable with comma-separated API "
                                                                      "keys; when set, requests need one as Bearer "
                                                                      "(read where build_app runs, and on each "
                                                                      "ingress replica's node).")
    api_keys_file: Optional[str] = Field(None, description="A file with one API key per line (`#` starts a "
                                                           "comment line).")
    api_key_sha256: list[str] = Field(default_factory=list, description="SHA-256 hex digests of accepted keys; "
                                                                        "build_app adds those of api_keys_env and "
                                                                        "api_keys_file, so replicas get no key in "
                                                                        "clear.")
    host: str = Field(LOOPBACK, description="Where the HTTP proxy listens (ember serve passes it to Ray Serve; "
                                               "each ingress replica checks the proxy's actual host).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Ray Serve's proxy.")
    allow_unauthenticated: bool = Field(False, description="Allow a host beyond 127.0.0.1 without API keys.")
    num_replicas: Optional[int] = Field(None, ge=1, description="A fixed engine replica count (instead of "
                                                                "autoscaling).")
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs, description="Engine replica autoscaling.")
    num_cpus: float = Field(1, gt=0, description="CPUs per engine replica.")
    num_gpus: int = Field(0, ge=0, description="GPUs per engine replica, one tensor-parallel rank each (vLLM's "
                                               "tensor_parallel_size); 0 serves on CPU.")
    accelerator_type: Optional[str] = Field(None, description="The GPU type replicas need (Ray's accelerator_type, "
                                                              "e.g. H100).")
    ingress_num_cpus: float = Field(0.1, ge=0, description="CPUs per ingress replica (it only validates and "
                                                           "forwards), so that one small node holds both.")
    ingress_max_ongoing_requests: int = Field(4096, ge=1, description="Requests one ingress replica holds at once, "
                                                                      "each from its first byte to its answer's "
                                                                      "last; beyond it they wait in Serve's proxy.")

    @model_validator(mode="after")
    def _checks(self):
        if self.dtype is None:  # the device's: bf16 on a GPU, fp32 on CPU
            self.dtype = "bfloat16" if self.num_gpus else "float32"
        if self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("autoscaling.min_replicas is above autoscaling.max_replicas")
        if self.kv_cache_memory_gb is None and not self.num_gpus:
            raise ValueError("kv_cache_memory_gb: a CPU replica needs a KV cache size (gpu_memory_utilization is "
                             "for GPUs)")
        bad = [d for d in self.api_key_sha256 if len(d) != 64 or any(c not in "0123456789abcdef" for c in d)]
        if bad:
            raise ValueError(f"api_key_sha256: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not a "
                             "SHA-256 hex digest (64 lowercase hex characters)")
        bad = [name for name in self.adapters if not name or ":" in name or "/" in name]
        if bad:
            raise ValueError(f"adapters: {bad[0]!r} is not an adapter name (no ':' or '/', not empty)")
        return self

    def key_digests(self, *, missing_ok: bool = False) -> list[str]:
        """The accepted keys' digests: the configured ones and those of the keys this process can read."""
        keys = read_api_keys(self.api_keys_env, self.api_keys_file, missing_ok=missing_ok)
        return sorted(set(self.api_key_sha256) | {key_digest(k) for k in keys})

    def max_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_num_seqs

    def prompt_chars(self, max_model_len: int) -> int:
        """Characters of one prompt at most: `max_prompt_chars`, or its default for a context of `max_model_len`."""
        return self.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * max_model_len
