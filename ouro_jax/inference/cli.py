"""Generate text with an Ouro model, streamed as it is produced.

  python -m ouro_jax.generate --model=PATH --prompt=TEXT [--chat] [--exit_threshold=q] [--kv_sharing=last]
      [--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]

PATH: an ouro_jax run directory (its latest checkpoint) or a Hugging Face Ouro directory, loaded by
`ouro_jax.convert.pretrained.from_pretrained`. The text goes through the Ouro tokenizer (or
PATH/tokenizer.json when present, or --tokenizer); with --chat the prompt is one ChatML user turn
followed by the assistant prompt. Generation stops at <|im_end|> or <|endoftext|>. Text is printed as
soon as it forms complete UTF-8 characters; a last line reports the mean depth used (loops per token).
Bad input: one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from ouro_jax.inference.cache import SHARING
from ouro_jax.inference.decode import EXIT_POLICIES


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ouro_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ouro_jax run directory or Hugging Face Ouro directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn")
    p.add_argument("--tokenizer", default=None, help="'ouro' or a tokenizer.json (default: PATH's or 'ouro')")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--exit_threshold", type=float, default=None, help="Q-exit q in [0, 1]")
    p.add_argument("--exit_at_step", type=int, default=None, help="always use loop step k (0-based)")
    p.add_argument("--exit_policy", choices=EXIT_POLICIES, default="gate")
    p.add_argument("--hidden_delta_eps", type=float, default=0.05)
    p.add_argument("--kv_sharing", choices=SHARING, default="none")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and compute dtype")
    return p


class _TextStream:
    """Prints the text of a growing token list, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids, self.printed, self.stopped = [], "", False

    def __call__(self, index, tokens, exit_steps, done):
        del index, exit_steps
        if done[0] or self.stopped:
            return
        token = int(tokens[0])
        self.stopped = token in self.stop_ids
        if not self.stopped:
            self.ids.append(token)
            self.flush(final=False)

    def flush(self, final: bool):
        text = self.tokenizer.decode(self.ids)
        if final or not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only checkpoint directories
    try:
        from ouro_jax import tokenizer as tok
        from ouro_jax.convert.pretrained import from_pretrained
        from ouro_jax.inference.decode import generate

        model = from_pretrained(args.model, dtype=args.dtype)
        source = args.tokenizer or (args.model if os.path.isfile(os.path.join(args.model, "tokenizer.json"))
                                    else "ouro")
        tokenizer = tok.load(source)
        vocab = model.config.vocab_size
        if tokenizer.get_vocab_size() > vocab:
            raise ValueError(f"tokenizer {source} has {tokenizer.get_vocab_size()} tokens, more than the "
                             f"model's vocab_size {vocab}")
        if args.chat:
            ids = tok.encode_chat(tokenizer, [{"role": "user", "content": args.prompt}])
        else:
            ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        if not ids:
            raise ValueError("the prompt is empty after tokenization")
        stream = _TextStream(tokenizer, tok.STOP_IDS)
        out = generate(model, [ids], args.max_new_tokens, exit_threshold=args.exit_threshold,
                       exit_at_step=args.exit_at_step, exit_policy=args.exit_policy,
                       hidden_delta_eps=args.hidden_delta_eps, kv_sharing=args.kv_sharing,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop_tokens=tok.STOP_IDS, on_token=stream)
    except (OSError, ValueError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 1
    stream.flush(final=True)
    s = out.stats
    print(f"\n\n[mean depth {s.mean_depth:.2f} of {model.config.total_ut_steps} loops | "
          f"{int(out.lengths[0])} tokens | {s.tokens_per_s:.1f} tokens/s]")
    return 0
