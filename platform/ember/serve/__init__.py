"""The serving plane: vLLM through Ray Serve LLM (`ray.serve.llm`), with Ember's typed OpenAI protocol and guard in
front of it. `app` builds the application from a serve spec (`ServeArgs`), `server` is the engine replica (vLLM's
`LLMServer` with Ember's storage), `ingress` the HTTP routes, `protocol` and `guard` what every request passes,
`stats` the engine's figures for `/health`, `launch` what `ember serve` does."""
