"""The serving plane: the generation engine (continuous batching), the OpenAI-compatible FastAPI app, the Ray Serve
deployment and `build_app`, and `ember serve`."""
