"""The names of the metrics Ember exports through Ray's metrics (scraped by Prometheus, shown in Grafana).

Ray prefixes application metrics with `ray_`, so `ember_train_loss` is scraped as `ray_ember_train_loss`.
"""

from __future__ import annotations

TRAIN_GAUGES = {
    "ember_train_loss": "Training loss (mean over the step's micro batches and workers).",
    "ember_train_val_loss": "Validation loss at the latest evaluation.",
    "ember_train_learning_rate": "Learning rate of the latest step.",
    "ember_train_grad_norm": "Global gradient norm before clipping.",
    "ember_train_tokens_per_second": "Training tokens per second over the latest log interval, all workers.",
    "ember_train_mfu": "Model FLOPs utilisation (GPU runs only).",
    "ember_train_step": "Optimizer steps done.",
    "ember_train_step_time_seconds": "Seconds per optimizer step over the latest log interval.",
}
TRAIN_TAGS = ("run",)


class TrainMetrics:
    """Ray metrics gauges for one run; call `record(figures)` with keys without the `ember_train_` prefix."""

    def __init__(self, run: str):
        from ray.util.metrics import Gauge  # here: the names above are read without Ray (the dashboards' check)

        self.tags = {"run": run}
        self.gauges = {name: Gauge(name, description=text, tag_keys=TRAIN_TAGS) for name, text in TRAIN_GAUGES.items()}

    def record(self, figures: dict) -> None:
        for key, value in figures.items():
            gauge = self.gauges.get(f"ember_train_{key}")
            if gauge is not None and value is not None:
                gauge.set(float(value), tags=self.tags)


# Serving metrics of the ingress replicas (Ray Serve adds the deployment, replica and application tags).
SERVE_METRICS = {
    "ember_serve_requests": "Requests answered, by route and HTTP status code (including those refused before vLLM).",
}

# vLLM's own metrics of the engine replicas, exported through Ray's metrics by ray.serve.llm (`log_engine_metrics`,
# vLLM's RayPrometheusStatLogger: `vllm:` becomes `vllm_`, Ray prefixes `ray_`); the Grafana dashboard shows these.
ENGINE_METRICS = {
    "vllm_time_to_first_token_seconds": "Seconds from a request's arrival to its first token (histogram).",
    "vllm_request_time_per_output_token_seconds": "Seconds per output token after the first, per request "
                                                  "(histogram).",
    "vllm_num_requests_running": "Sequences in the engine's running batch.",
    "vllm_num_requests_waiting": "Sequences waiting for room in the batch.",
    "vllm_kv_cache_usage_perc": "Share of the KV cache's blocks in use (0 to 1).",
    "vllm_prefix_cache_queries": "Prompt tokens looked up in the prefix cache (counter).",
    "vllm_prefix_cache_hits": "Prompt tokens found in the prefix cache (counter).",
    "vllm_generation_tokens": "Tokens generated (counter).",
}
