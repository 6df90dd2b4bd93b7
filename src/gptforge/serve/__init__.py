"""`gptforge serve`: a model behind OpenAI's completions and chat completions API, batched, with a web
playground.

Data flows one way, from the process down to the model:

- server.py: the process: `ServeOptions`, loading the model, uvicorn, the drain on SIGTERM.
- app.py: the HTTP app: its routes (`/`, `/health`, `/v1/models`, `/v1/models/{id}`, `/v1/completions`,
  `/v1/chat/completions`) and `create_app`.
- guards.py: what a request must pass first: the body size limit and the API key.
- api.py: OpenAI's shapes: the completion and chat requests and responses, every error as OpenAI writes it.
- completions.py: a request's prompts into engine jobs, their deltas into JSON or server-sent events.
- chat.py: a conversation rendered with the chat template into a job, its deltas into chat completions.
- logprobs.py: the engine's logprobs in OpenAI's shapes, and how a token is shown (its text or its bytes).
- engine.py: continuous batching over the KV cache; it knows no HTTP and needs neither FastAPI nor uvicorn.
- playground.html: the page at `/`.

This file imports nothing, so `gptforge.serve.engine` loads without the `serve` extra.
"""
