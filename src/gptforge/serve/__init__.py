"""`gptforge serve`: a model behind OpenAI's completions API, batched, with a web playground.

Data flows one way, from the process down to the model:

- server.py: the process: `ServeOptions`, loading the model, uvicorn, the drain on SIGTERM.
- app.py: the HTTP app: its routes (`/`, `/health`, `/v1/models`, `/v1/completions`) and `create_app`.
- guards.py: what a request must pass first: the body size limit and the API key.
- api.py: OpenAI's shapes: the completion request, and every error as OpenAI writes it.
- completions.py: a request's prompts into engine jobs, their deltas into JSON or server-sent events.
- engine.py: continuous batching over the KV cache; it knows no HTTP and needs neither FastAPI nor uvicorn.
- playground.html: the page at `/`.

This file imports nothing, so `gptforge.serve.engine` loads without the `serve` extra.
"""
