"""E0, replay exactness: `python -m ouro_jax.rl.exactness [--init_from=DIR]` prints a markdown table.

For every decode setting (kv_sharing "none" with skipped_kv compute / copy / project; kv_sharing "last"
and "average"), Q-exit thresholds q and batch sizes it samples rollouts with `generate` (`rollout`:
ragged prompts, the first row stopping halfway), replays them (`replay.replay_jit`) and compares each
token's log-prob with the sampler's record (`GenerateOutput.logprobs`): max |Δ| over generated tokens.
Beside it: how many exits would flip if the trainer recomputed them from the replayed gates instead of
replaying them, and the mismatch a fixed-depth trainer would see on the same tokens (last loop; the
exit-pdf mixture), max and mean |Δ|.
Without --init_from the model is a seeded random `tiny` Ouro whose gate and LM head are scaled up
(`sharp_model`) so that tokens exit after every loop and the distributions are far from uniform.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from ouro_jax import cli

_INIT_FROM = flags.DEFINE_string("init_from", None, "An HF directory or ouro_jax run (default: sharp_model).")
_QS = flags.DEFINE_list("qs", ["0.2", "0.5", "0.8"], "Q-exit thresholds.")
_BATCHES = flags.DEFINE_list("batches", ["1", "5"], "Batch sizes (rows of RAGGED, repeated).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 24, "Generated tokens per row.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Model and sampling seed.")

RAGGED = ([5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [40, 41, 42, 43, 44], [60, 2, 99, 14],
          [7, 77, 70, 33, 3, 1])
SETTINGS = (("none", "compute"), ("none", "copy"), ("none", "project"), ("last", "copy"),
            ("average", "copy"))  # (kv_sharing, skipped_kv); sharing runs as "copy" in generate


def sharp_model(seed: int = 1):
    """A random `tiny` Ouro with its exit gate x12 and LM head x8: tokens exit after every loop and the
    next-token distributions are peaked, so replay errors are not hidden by uniform outputs."""
    from flax import nnx

    from ouro_jax.model.config import tiny
    from ouro_jax.model.ouro import Ouro

    model = Ouro(tiny(), rngs=nnx.Rngs(seed))
    model.early_exit_gate.kernel[...] = model.early_exit_gate.kernel[...] * 12
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 8
    return model


def rollout(model, rows, new_tokens: int, temperature: float, seed: int, **kwargs):
    """Sampled rollouts of `rows` where the first row stops in its second half: a first `generate` picks
    that row's first token from new_tokens // 2 on that it had not generated before as the stop token of
    the second (same seeds, so the same tokens up to the stop; the stop set is traced, so no
    recompilation) -> (input_ids, prompt_lengths, GenerateOutput)."""
    from ouro_jax.inference import generate, left_pad

    ids, lengths = left_pad(rows)
    run = lambda stop: generate(model, ids, new_tokens, prompt_lengths=lengths, temperature=temperature,
                                seed=list(range(seed, seed + len(rows))), stop_tokens=stop,
                                **kwargs)
    first = run(()).tokens[0].tolist()
    half = new_tokens // 2
    return ids, lengths, run([t for t in first[half:] if t not in first[:half]][:1])


def measure(model, rows, new_tokens: int, q: float, kv_sharing: str, skipped_kv: str, temperature: float,
            seed: int) -> dict:
    """One rollout batch and its replay -> {"tokens", "mean_loops", "replay_max", "exit_flips",
    "last_max", "last_mean", "mixture_max", "mixture_mean"} (|Δ| log-prob against the record)."""

    from ouro_jax.model import exits
    from ouro_jax.rl import replay

    ids, lengths, out = rollout(model, rows, new_tokens, temperature, seed, exit_threshold=q,
                                kv_sharing=kv_sharing, skipped_kv=skipped_kv)
    recorded = out.logprobs
    t = model.config.total_ut_steps
    cols = replay.columns(ids, lengths, out.tokens, out.exit_loops, t)
    replayed = replay.replay_jit(model, cols, ids.shape[1], temperature, skipped_kv=skipped_kv,
                                 kv_sharing=kv_sharing)
    last, mixture = replay.fixed_depth_logprobs(model, cols, ids.shape[1], temperature)
    mask = out.exit_loops > 0
    recomputed = np.asarray(exits.q_exit_loop(replayed.gate_logits, q)) + 1
    delta = lambda x: np.abs(np.asarray(x) - recorded)[mask]
    return {"tokens": int(mask.sum()), "mean_loops": float(out.exit_loops[mask].mean()),
            "replay_max": float(delta(replayed.logprobs).max()),
            "exit_flips": int((recomputed != out.exit_loops)[mask].sum()),
            "last_max": float(delta(last).max()), "last_mean": float(delta(last).mean()),
            "mixture_max": float(delta(mixture).max()), "mixture_mean": float(delta(mixture).mean())}


def main(argv):
    del argv
    qs, batches = [float(q) for q in _QS.value], [int(b) for b in _BATCHES.value]
    if not all(0 <= q <= 1 for q in qs) or min(batches) < 1 or _NEW_TOKENS.value < 2 or (
            _TEMPERATURE.value <= 0):
        raise cli.UserError("need qs in [0, 1], batches >= 1, new_tokens >= 2, temperature > 0")
    if _INIT_FROM.value:
        from ouro_jax.convert.pretrained import from_pretrained
        model = from_pretrained(_INIT_FROM.value)
    else:
        model = sharp_model(_SEED.value + 1)
    print("| kv_sharing | skipped_kv | q | batch | tokens | mean loops | replay max abs Δ | exits flipped "
          "if recomputed | last loop max / mean abs Δ | exit mixture max / mean abs Δ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kv_sharing, skipped_kv in SETTINGS:
        for q in qs:
            for b in batches:
                rows = [RAGGED[i % len(RAGGED)] for i in range(b)]
                r = measure(model, rows, _NEW_TOKENS.value, q, kv_sharing, skipped_kv, _TEMPERATURE.value,
                            _SEED.value)
                print(f"| {kv_sharing} | {skipped_kv} | {q} | {b} | {r['tokens']} | {r['mean_loops']:.2f} | "
                      f"{r['replay_max']:.1e} | {r['exit_flips']} | {r['last_max']:.2f} / "
                      f"{r['last_mean']:.3f} | {r['mixture_max']:.2f} / {r['mixture_mean']:.3f} |",
                      flush=True)


if __name__ == "__main__":
    cli.run(main)
