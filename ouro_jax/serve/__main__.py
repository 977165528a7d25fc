"""`python -m ouro_jax.serve`: the OpenAI-compatible server.

    python -m ouro_jax.serve --model=PATH [--host=127.0.0.1 --port=8000 --max_slots=8 --max_context=N
        --exit_threshold=q --skipped_kv=project --kv_sharing=none --api_key=KEY --served_model_name=NAME
        --tokenizer=ouro|FILE --backend=engine --dtype=float32]

PATH: a Hugging Face Ouro directory or an ouro_jax run (`ouro_jax.from_pretrained`); the tokenizer is
PATH/tokenizer.json when present, else the bundled Ouro one. SIGTERM (or Ctrl-C) stops accepting
connections, finishes the requests in flight and exits 0. Bad flags print one line `error: ...` and exit 1
before the model loads.
"""

from __future__ import annotations

import signal

from absl import flags

from ouro_jax import cli
from ouro_jax.inference.cache import SHARING
from ouro_jax.inference.decode import DEFAULT_SKIPPED_KV, SKIPPED_KV

_MODEL = flags.DEFINE_string("model", None, "Hugging Face Ouro directory or ouro_jax run directory.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port (0: any free port).")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 8, "Requests decoded together (batch rows).")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", None, "Prompt + generated tokens per request "
                                    "(default: the model's max_position_embeddings).")
_EXIT_THRESHOLD = flags.DEFINE_float("exit_threshold", None, "Default Q-exit q in [0, 1] (requests may "
                                     "set their own `exit_threshold`); default: full depth.")
_SKIPPED_KV = flags.DEFINE_enum("skipped_kv", DEFAULT_SKIPPED_KV, SKIPPED_KV,
                                "K/V of the loops an early-exiting token skips (see generate).")
_KV_SHARING = flags.DEFINE_enum("kv_sharing", "none", SHARING, "Decode-time KV sharing.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` on every request "
                               "but /health.")
_NAME = flags.DEFINE_string("served_model_name", None, "The model id clients send (default: PATH's last "
                            "component).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'ouro' or a tokenizer.json (default: PATH's or 'ouro').")
_BACKEND = flags.DEFINE_string("backend", "engine", "Decoding backend (`ouro_jax.serve.server.BACKENDS`): "
                               "engine (continuous batching) or static (`generate` batches).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.mark_flag_as_required("model")


def main(argv):
    del argv
    import uvicorn

    from ouro_jax.serve.server import BACKENDS, build

    if _BACKEND.value not in BACKENDS:
        raise cli.UserError(f"--backend={_BACKEND.value}: choose from {', '.join(BACKENDS)}")
    if not 0 <= _PORT.value < 65536:
        raise cli.UserError(f"--port={_PORT.value} must lie in [0, 65535]")
    if _MAX_SLOTS.value < 1:
        raise cli.UserError(f"--max_slots={_MAX_SLOTS.value} must be >= 1")
    if _EXIT_THRESHOLD.value is not None and not 0 <= _EXIT_THRESHOLD.value <= 1:
        raise cli.UserError(f"--exit_threshold={_EXIT_THRESHOLD.value} must lie in [0, 1]")
    if _API_KEY.value is not None and not _API_KEY.value:
        raise cli.UserError("--api_key is empty")
    app, _ = build(_MODEL.value, backend=_BACKEND.value, tokenizer=_TOKENIZER.value,
                   max_slots=_MAX_SLOTS.value, max_context=_MAX_CONTEXT.value,
                   exit_threshold=_EXIT_THRESHOLD.value, skipped_kv=_SKIPPED_KV.value,
                   kv_sharing=_KV_SHARING.value, api_key=_API_KEY.value,
                   model_name=_NAME.value, dtype=_DTYPE.value)
    # uvicorn drains on SIGTERM / SIGINT, then restores the handlers it found and raises the signal again;
    # handlers that ignore it make the drained server exit 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=_HOST.value, port=_PORT.value, log_level="warning")


if __name__ == "__main__":
    cli.run(main)
