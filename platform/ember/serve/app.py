"""Ember's serving app on `ray.serve.llm`: `build_app(args) -> Application` for `serve/*.yaml`, `ember serve`, and
Ray's own `serve run` / `serve deploy`.

The app is two deployments, as `ray.serve.llm`'s `build_openai_app` builds them:
- `EmberLLMServer:<model id>` (`ember.serve.server`): `ray.serve.llm`'s `LLMServer`, one vLLM engine per replica,
  autoscaled, with its placement-group bundles (one per GPU rank, or the CPUs of a CPU replica);
- `EmberIngress` (`ember.serve.ingress`): the HTTP routes, with Ember's typed protocol and guard in front of vLLM.

`ServeArgs` (`ember.serve.args`) are the app's `args`; `llm_config` turns them into the `LLMConfig` vLLM is started
from. Everything that can be checked before anything is deployed is checked here: the model dir, the context, the keys.
"""

from __future__ import annotations

from ray.serve import Application

from ember import storage
from ember.data.tokenizer import tokenizer_config
from ember.errors import EmberError
from ember.model import builtin
from ember.model.hf import read_json
from ember.serve.args import ServeArgs
from ember.serve.guard import require_keys

GIB = 1 << 30
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.29's CPU attention backend's


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
