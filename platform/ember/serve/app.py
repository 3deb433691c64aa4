"""Ember's serving app on `ray.serve.llm`: `build_app(args) -> Application` for `serve/*.yaml`, `ember serve`, and
Ray's own `serve run` / `serve deploy`.

The app is two deployments, as `ray.serve.llm`'s `build_openai_app` builds them:
- `EmberLLMServer:<model id>` (`ember.serve.server`): `ray.serve.llm`'s `LLMServer`, one vLLM engine per replica,
  autoscaled, with its placement-group bundles (one per GPU rank, or the CPUs of a CPU replica);
- `EmberIngress` (`ember.serve.ingress`): the HTTP routes, with Ember's typed protocol and guard in front of vLLM.

`ServeArgs` are the app's `args`; `llm_config` turns them into the `LLMConfig` vLLM is started from. Everything
that can be checked before anything is deployed is checked here: the model dir, the context, the keys.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator
from ray.serve import Application

from ember import storage
from ember.config.specs import SpecModel
from ember.data.tokenizer import tokenizer_config
from ember.errors import EmberError
from ember.model import builtin
from ember.model.hf import read_json
from ember.serve.guard import key_digest, read_api_keys, require_keys
from ember.serve.protocol import MAX_N

GIB = 1 << 30
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.29's CPU attention backend's
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
    host: str = Field("127.0.0.1", description="Where the HTTP proxy listens (ember serve passes it to Ray Serve; "
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


def model_facts(args: ServeArgs, path: str) -> dict:
    """What the ingress checks requests against, read from the model dir: its id, context, vocabulary and whether it
    has a chat template. Raises EmberError naming the dir or the field."""
    config = storage.join(path, "config.json")
    if not storage.is_file(config):
        raise EmberError(f"model_dir: {storage.display(path)} is not a model directory (no config.json)")
    hf = read_json(config)
    context = hf.get("max_position_embeddings")
    if not isinstance(context, int) or context < 2:
        raise EmberError(f"{storage.display(config)}: max_position_embeddings is missing or not a context length")
    if args.max_model_len is not None and args.max_model_len > context:
        raise EmberError(f"max_model_len: {args.max_model_len} is more than the model's context of {context} tokens")
    heads = hf.get("num_attention_heads") or 1
    head_dim = hf.get("head_dim") or hf.get("hidden_size", 0) // heads
    if not args.num_gpus and head_dim not in CPU_HEAD_SIZES:
        raise EmberError(f"{storage.display(config)}: heads of {head_dim} dimensions; vLLM's CPU attention takes "
                         f"{', '.join(map(str, CPU_HEAD_SIZES))} (serve it on a GPU, num_gpus: 1)")
    name = args.model_name or (args.model_dir[len(builtin.PREFIX):] if builtin.is_builtin(args.model_dir)
                               else storage.name(args.model_dir))
    if ":" in name:
        raise EmberError(f"model_name: {name!r} holds ':', which separates a model from its adapter in requests")
    return {"name": name, "max_model_len": args.max_model_len or context, "vocab_size": hf.get("vocab_size"),
            "chat_template": bool(tokenizer_config(path).get("chat_template"))}


def llm_config(args: ServeArgs, facts: dict):
    """The `LLMConfig` of the engine replicas (see the module docstring); vLLM checks `engine_kwargs` here."""
    from ray.serve.llm import LLMConfig, LoraConfig

    gpu = args.num_gpus > 0
    engine = {"dtype": args.dtype, "max_model_len": facts["max_model_len"], "max_num_seqs": args.max_num_seqs,
              "enable_prefix_caching": args.enable_prefix_caching, "load_format": "safetensors",
              "tensor_parallel_size": max(1, args.num_gpus), "enable_prompt_tokens_details": True}
    if args.kv_cache_memory_gb is not None:
        engine["kv_cache_memory_bytes"] = int(args.kv_cache_memory_gb * GIB)
    else:
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    if not gpu:
        engine["enforce_eager"] = True  # CPU: no graphs to capture, and a compile would cost minutes per start
    if args.max_num_batched_tokens:
        engine["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.adapters or args.adapter_prefix:
        engine.update(enable_lora=True, max_loras=args.max_adapters, max_lora_rank=args.max_lora_rank)
    clash = sorted(set(engine) & set(args.engine_kwargs))
    if clash:
        raise EmberError(f"engine_kwargs: {', '.join(clash)} set by other keys of the serve args; set them there")
    engine.update(args.engine_kwargs)
    bundles = [{"GPU": 1, "CPU": 1} for _ in range(args.num_gpus)] if gpu else [{"CPU": args.num_cpus}]
    env = dict(args.env_vars)
    if not gpu:
        # vLLM's CPU backend keeps a core for its scheduler and binds its compute threads to the others: on a small
        # node that is half the compute (on 2 cores, serving SmolLM2 at 32 concurrent went from 150 to 205 tok/s).
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    config = LLMConfig(
        model_loading_config={"model_id": facts["name"], "model_source": args.model_dir},
        engine_kwargs=engine, accelerator_type=args.accelerator_type,
        placement_group_config={"bundles": bundles},
        deployment_config=_engine_deployment(args),
        lora_config=LoraConfig(max_num_adapters_per_replica=args.max_adapters)
        if args.adapters or args.adapter_prefix else None,
        runtime_env={"env_vars": env} if env else None, log_engine_metrics=True)
    try:
        config.get_engine_config()
    except ValueError as exc:
        raise EmberError(f"engine_kwargs: {exc}") from None
    return config


def _engine_deployment(args: ServeArgs) -> dict:
    """Serve's options of the engine deployment: replicas, and the admission bounds behind `max_queue`'s 503."""
    options = {"max_ongoing_requests": args.max_requests(), "max_queued_requests": args.max_queue,
               "health_check_period_s": 5, "health_check_timeout_s": 30,
               "ray_actor_options": {"num_cpus": 1 if args.num_gpus else 0}}  # a CPU replica's CPUs are its bundle's
    if args.num_replicas:
        options["num_replicas"] = args.num_replicas
    else:
        a = args.autoscaling
        options["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "initial_replicas": max(1, a.min_replicas),
                                         "target_ongoing_requests": a.target_ongoing_requests,
                                         "upscale_delay_s": a.upscale_delay_s,
                                         "downscale_delay_s": a.downscale_delay_s}
    return options


def build_app(args: ServeArgs) -> Application:
    """The Ray Serve application for a model dir (Ray validates `args` against ServeArgs). The keys this process can
    read travel to the ingress as digests; the model, the context and the key requirement are checked here first,
    so a bad config fails before anything is deployed."""
    from ray.serve.llm import build_llm_deployment

    from ember.serve.ingress import EmberIngress
    from ember.serve.server import EmberLLMServer

    if isinstance(args, dict):
        args = ServeArgs.model_validate(args)
    path = builtin.resolve(args.model_dir)
    facts = model_facts(args, path)
    digests = args.key_digests()
    require_keys(args.host, bool(digests), args.allow_unauthenticated, "build_app")
    given = args.model_dir if builtin.is_builtin(args.model_dir) else path  # each node resolves builtin:
    args = args.model_copy(update={"model_dir": given, "api_key_sha256": digests})
    server = build_llm_deployment(llm_config(args, facts), deployment_cls=EmberLLMServer, bind_kwargs={
        "model_dir": given, "adapters": args.adapters, "adapter_prefix": args.adapter_prefix,
        "max_adapters": args.max_adapters})
    options = {"ray_actor_options": {"num_cpus": args.ingress_num_cpus},
               "max_ongoing_requests": args.ingress_max_ongoing_requests, "health_check_period_s": 5}
    return EmberIngress.options(**options).bind(server, args.model_dump(), facts)
