"""An OpenAI-compatible server for Ouro: `python -m ouro_jax.serve --model=PATH` (flags: `__main__.py`).

  POST /v1/completions       prompt as text, token ids or a list of either; max_tokens, temperature,
                             top_p, top_k, stop, seed, n, stream, logprobs, echo (echo + logprobs: the
                             prompt tokens' log-probabilities, as vLLM returns them for lm-eval's
                             `local-completions`), and the extension exit_threshold (per-request Q-exit q)
  POST /v1/chat/completions  ChatML through the model's tokenizer; streaming
  GET /v1/models, GET /health
  `usage` adds mean_loops_per_token (the mean exit loop of the generated tokens).

Layers: `app.py` (HTTP, validation, OpenAI's JSON) -> `runner.py` (one thread driving the backend) ->
a backend with add_request / abort / step / has_work (`backend.StaticBatchBackend`, static batches of
`ouro_jax.generate`; the continuous-batching engine implements the same interface) -> `server.build`
ties them to a checkpoint; `scoring.py` computes prompt log-probabilities.

Why FastAPI on uvicorn: the ASGI stack that vLLM's and SGLang's OpenAI-compatible servers use, well kept and
in the package index; pydantic models give strict request validation with field-level messages (turned into
OpenAI's error JSON here), StreamingResponse gives server-sent events and cancels the stream when the client
disconnects (which aborts its requests), and uvicorn's SIGTERM handling stops accepting connections and
waits for the requests in flight before the app's shutdown hook stops the decoding thread. The decoding runs
in its own thread, never on the event loop, so the server keeps answering (and refusing bad input) while a
batch decodes.
"""
