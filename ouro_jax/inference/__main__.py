"""`python -m ouro_jax.inference`: generate with an Ouro model, streamed as it is produced.

    python -m ouro_jax.inference --model=PATH --prompt=TEXT [--chat] [--exit_threshold=q] [--kv_sharing=last]
        [--skipped_kv=compute|project|copy] [--exit_policy=gate|hidden_delta|hidden_delta_relative]
        [--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]
    python -m ouro_jax.inference --model=PATH --prompt_file=FILE ...
    python -m ouro_jax.inference --model=PATH --prompt_ids=1,2,3 [--stop_ids=...] ...

PATH: an ouro_jax run directory (its latest checkpoint) or a Hugging Face Ouro directory, loaded by
`ouro_jax.from_pretrained`. Text (--prompt, or --prompt_file read as UTF-8) goes through the Ouro tokenizer
(or PATH/tokenizer.json when present, or a run's data.tokenizer, or --tokenizer); with --chat the prompt is
one ChatML user turn followed by the assistant prompt, and generation stops at <|im_end|> or <|endoftext|>.
Text is printed as soon as it forms complete UTF-8 characters. --prompt_ids gives token ids instead (for
models without a text tokenizer, e.g. the p-hop demo): no tokenizer is loaded, the generated ids are printed
comma-separated, and generation stops only at --stop_ids. A last line reports the mean depth used (loops per
token). Bad input prints one line `error: ...` and exits with 1.
"""

from __future__ import annotations

import sys

from absl import flags

from ouro_jax import cli
from ouro_jax.convert.pretrained import from_pretrained
from ouro_jax.inference.cache import SHARING
from ouro_jax.inference.decode import DEFAULT_SKIPPED_KV, EXIT_POLICIES, SKIPPED_KV, generate

_MODEL = flags.DEFINE_string("model", None, "ouro_jax run directory or Hugging Face Ouro directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File holding the prompt text (UTF-8).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt token ids (comma-separated); no tokenizer.")
_STOP_IDS = flags.DEFINE_list("stop_ids", None, "Token ids that end generation (default: <|im_end|> and "
                              "<|endoftext|> for text, none for --prompt_ids).")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt text as a ChatML user turn.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'ouro' or a tokenizer.json (default: PATH's or 'ouro').")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_EXIT_THRESHOLD = flags.DEFINE_float("exit_threshold", None, "Q-exit q in [0, 1] on the gate's CDF.")
_EXIT_AT_LOOP = flags.DEFINE_integer("exit_at_loop", None, "Run loops 1..k for every token (k in 1..T).")
_EXIT_POLICY = flags.DEFINE_enum("exit_policy", "gate", EXIT_POLICIES, "Adaptive exit rule.")
_HIDDEN_DELTA_EPS = flags.DEFINE_float("hidden_delta_eps", 0.05, "Threshold of --exit_policy=hidden_delta "
                                        "(absolute ||h_t - h_t-1||) and hidden_delta_relative.")
_KV_SHARING = flags.DEFINE_enum("kv_sharing", "none", SHARING, "Decode-time KV sharing.")
_SKIPPED_KV = flags.DEFINE_enum("skipped_kv", DEFAULT_SKIPPED_KV, SKIPPED_KV,
                                "K/V of the loops an early-exiting token skips (see generate).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling probability mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.mark_flag_as_required("model")


class _Stream:
    """Prints the generated tokens of row 0 as they arrive (stop token excluded): `render(ids)` -> text;
    text ending in an incomplete UTF-8 character is held back until it completes."""

    def __init__(self, render, stop_ids):
        self.render, self.stop_ids = render, set(stop_ids)
        self.ids, self.printed, self.stopped = [], "", False

    def __call__(self, index, tokens, exit_loops, done):
        del index, exit_loops
        if done[0] or self.stopped:
            return
        token = int(tokens[0])
        self.stopped = token in self.stop_ids
        if not self.stopped:
            self.ids.append(token)
            self.flush(final=False)

    def flush(self, final: bool):
        text = self.render(self.ids)
        if final or not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def _token_ids(values: list[str], flag: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise cli.UserError(f"--{flag}={','.join(values)}: expected comma-separated integer token "
                            "ids") from None


def _prompt_text() -> str:
    """The prompt of --prompt or --prompt_file, refused unless it is valid UTF-8."""
    if _PROMPT_FILE.value is not None:
        data = open(_PROMPT_FILE.value, "rb").read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise cli.UserError(f"--prompt_file={_PROMPT_FILE.value} is not valid UTF-8 text (byte "
                                f"{data[err.start]:#04x} at offset {err.start})") from None
    text = _PROMPT.value
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # undecodable argv bytes arrive as lone surrogates
        raise cli.UserError(f"--prompt is not valid UTF-8 text (at character {err.start})") from None
    return text


def _text_prompt(text: str, vocab_size: int):
    """(prompt ids, stop ids, render) of a text prompt through the tokenizer."""
    from ouro_jax import tokenizer as tok

    source = _TOKENIZER.value or tok.for_model(_MODEL.value)
    tokenizer = tok.load(source)
    if tokenizer.get_vocab_size() > vocab_size:
        raise cli.UserError(f"tokenizer {source} has {tokenizer.get_vocab_size()} tokens, more than the "
                            f"model's vocab_size {vocab_size} (give token ids with --prompt_ids)")
    if _CHAT.value:
        ids = tok.encode_chat(tokenizer, [{"role": "user", "content": text}])
    else:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise cli.UserError("the prompt is empty after tokenization")
    return ids, tok.STOP_IDS, tokenizer.decode


def main(argv):
    del argv
    given = [name for name, flag in (("prompt", _PROMPT), ("prompt_file", _PROMPT_FILE),
                                     ("prompt_ids", _PROMPT_IDS)) if flag.value is not None]
    if len(given) != 1:
        raise cli.UserError("give exactly one of --prompt, --prompt_file, --prompt_ids"
                            + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
    stop = None if _STOP_IDS.value is None else _token_ids(_STOP_IDS.value, "stop_ids")
    if _PROMPT_IDS.value is not None:
        if _CHAT.value or _TOKENIZER.value:
            raise cli.UserError("--chat and --tokenizer need a text prompt, not --prompt_ids")
        ids, text = _token_ids(_PROMPT_IDS.value, "prompt_ids"), None
        if not ids:
            raise cli.UserError("--prompt_ids is empty")
    else:
        text = _prompt_text()  # checked before the model loads
    model = from_pretrained(_MODEL.value, dtype=_DTYPE.value)
    if text is None:
        stop, render = stop or [], lambda generated: ",".join(map(str, generated))
    else:
        ids, text_stop, render = _text_prompt(text, model.config.vocab_size)
        stop = text_stop if stop is None else stop
    stream = _Stream(render, stop)
    out = generate(model, [ids], _MAX_NEW_TOKENS.value, exit_threshold=_EXIT_THRESHOLD.value,
                   exit_at_loop=_EXIT_AT_LOOP.value, exit_policy=_EXIT_POLICY.value,
                   hidden_delta_eps=_HIDDEN_DELTA_EPS.value, kv_sharing=_KV_SHARING.value,
                   skipped_kv=_SKIPPED_KV.value,
                   temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                   stop_tokens=stop, on_token=stream)
    stream.flush(final=True)
    s = out.stats
    print(f"\n\n[mean depth {s.mean_depth:.2f} of {model.config.total_ut_steps} loops | "
          f"{int(out.lengths[0])} tokens | {s.tokens_per_s:.1f} tokens/s]")


if __name__ == "__main__":
    cli.run(main)
