"""`python -m ouro_jax.benchmarks --bench=NAME[,NAME...] [--json=FILE]`: run benchmarks, print each as
markdown and add its figures to FILE (a JSON object keyed by benchmark name; other entries are kept).

    python -m ouro_jax.benchmarks --bench=train                 # every train.* benchmark
    python -m ouro_jax.benchmarks --bench=train.fwd_bwd,train.step --scan_layers=false \
        --remat_policy=save_qkv_context
    python -m ouro_jax.benchmarks --bench=train.sft --batch=16 --seq_len=128 --sft_steps=30
    python -m ouro_jax.benchmarks --bench=decode --json=bench.json
    python -m ouro_jax.benchmarks --bench=decode.exit --run_dir=runs/demo
    python -m ouro_jax.benchmarks --bench=decode.rows --new_tokens=64 --repeats=3
    python -m ouro_jax.benchmarks --bench=decode.split --batches=1,8,32
    python -m ouro_jax.benchmarks --bench=convert.roundtrip --preset=ouro_1p4b
    python -m ouro_jax.benchmarks --bench=eval.sweep --repeats=1 --eval_docs=16
    python -m ouro_jax.benchmarks --bench=serve --serve_rates=1,4 --serve_thresholds=none,0.5

NAME is a benchmark (`BENCHMARKS`) or a group (train, decode, convert, eval). What each measures is in the
docstrings of `ouro_jax.benchmarks.train`, `.sft`, `.decode`, `.decode_split`, `.convert`, `.eval_sweep` and
`.serve`. Bad input prints one line.
"""

from __future__ import annotations

import sys

from absl import flags

from ouro_jax import cli
from ouro_jax.benchmarks import BENCHMARKS
from ouro_jax.benchmarks.common import SHAPES

_BENCH = flags.DEFINE_list("bench", None, "Benchmarks or groups to run: " + ", ".join(BENCHMARKS) + ".")
_JSON = flags.DEFINE_string("json", None, "Add the figures to this JSON file.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (train.*: median; decode.*: minimum).")
_SHAPE = flags.DEFINE_enum("shape", "cpu_benchmark", list(SHAPES),
                           "train.*, decode.*, serve: the model (cpu_benchmark: the figures'; tiny: smoke).")
# train.*
_BATCH = flags.DEFINE_integer("batch", 8, "train.*: batch rows.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "train.*: tokens per row.")
_REMAT_POLICY = flags.DEFINE_string("remat_policy", "none", "train.fwd_bwd, train.step: "
                                    "OuroConfig.remat_policy.")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", True, "train.fwd_bwd, train.step: OuroConfig.scan_layers.")
_BETA = flags.DEFINE_float("beta", 0.1, "train.*: Stage I entropy coefficient.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 30, "train.sft: training steps of each run (the first two "
                                  "untimed).", lower_bound=3)
# decode.*
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "decode.speed, decode.split: batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "decode.speed, .cache, .rows, .split: prompt length.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "decode.speed, .cache, .rows, .split: new tokens.")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "decode.exit: a trained p-hop run; default: train the demo "
                               "recipe into a temporary run.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 1500, "decode.exit: steps when it trains its own run.")
_EXAMPLES = flags.DEFINE_integer("examples", 256, "decode.exit: held-out p-hop sequences.")
_EXIT_BATCHES = flags.DEFINE_list("exit_batches", ["1", "16"], "decode.exit: batch sizes.")
_THRESHOLDS = flags.DEFINE_list(
    "thresholds", ["0.9", "0.7", "0.5", "0.3", "0.2", "0.1", "0.05", "0.02", "0.01", "0.005"],
    "decode.exit: Q-exit thresholds q.")
_DELTAS = flags.DEFINE_list("deltas", ["0.6", "0.7", "0.8", "1.0"], "decode.exit: hidden_delta_eps values.")
_MECHANISM_THRESHOLDS = flags.DEFINE_list("mechanism_thresholds", ["0.9", "0.7", "0.5", "0.3"],
                                          "decode.exit: Q-exit q of the skipping-mechanism table.")
_ROW_BATCHES = flags.DEFINE_list("row_batches", ["1", "8", "32"], "decode.rows: batch sizes.")
_GATE_SCALES = flags.DEFINE_list("gate_scales", ["10", "30"],
                                 "decode.rows: factors on the random exit gate's kernel.")
_ROW_THRESHOLDS = flags.DEFINE_list("row_thresholds", ["0.7", "0.4"], "decode.rows: Q-exit thresholds q.")
# convert.*
_PRESET = flags.DEFINE_string("preset", "ouro_1p4b", "convert.roundtrip: OuroConfig preset.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "convert.roundtrip: dtype of the parameters and of the files.")
_WORKDIR = flags.DEFINE_string("workdir", None, "convert.roundtrip: where the export goes (default: a "
                               "temporary directory).")
_KEEP = flags.DEFINE_bool("keep", False, "convert.roundtrip: keep the export.")
# eval.*
_EVAL_DOCS = flags.DEFINE_integer("eval_docs", 16, "eval.sweep: multiple-choice documents.", lower_bound=1)
_EVAL_LOOPS = flags.DEFINE_integer("eval_loops", 8, "eval.sweep: the sweep's loops 1..L.", lower_bound=1)
_EVAL_TRAINED = flags.DEFINE_integer("eval_trained_loops", 4, "eval.sweep: the model's trained T.",
                                     lower_bound=1)
_EVAL_HIDDEN = flags.DEFINE_integer("eval_hidden_size", 128, "eval.sweep: hidden size.", lower_bound=16)
_EVAL_LAYERS = flags.DEFINE_integer("eval_layers", 2, "eval.sweep: decoder layers.", lower_bound=1)
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 8, "eval.sweep: rows per scoring batch.", lower_bound=1)
# serve
_SERVE_BACKENDS = flags.DEFINE_list("serve_backends", ["static", "hf"], "serve: backends to load: "
                                    "ouro_jax.serve.server.BACKENDS names and 'hf' (Hugging Face generate).")
_SERVE_RATES = flags.DEFINE_list("serve_rates", ["1", "4"], "serve: Poisson arrival rates (requests/s).")
_SERVE_THRESHOLDS = flags.DEFINE_list("serve_thresholds", ["none", "0.5"],
                                      "serve: exit settings: 'none' (full depth) or a Q-exit q.")
_SERVE_REQUESTS = flags.DEFINE_integer("serve_requests", 32, "serve: requests per run.")
_SERVE_PROMPT_LENS = flags.DEFINE_list("serve_prompt_lens", ["16", "128"], "serve: prompt length range.")
_SERVE_OUTPUT_LENS = flags.DEFINE_list("serve_output_lens", ["8", "512"], "serve: output length range.")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 8, "serve: slots (batch rows) of every backend.")
_GATE_SCALE = flags.DEFINE_float("gate_scale", 10.0, "serve: factor on the random exit gate's kernel.")
flags.mark_flag_as_required("bench")


def selected(names: list[str]) -> list[str]:
    """Benchmark names from --bench (a group name stands for its benchmarks), in the order given."""
    out = []
    for name in names:
        group = [b for b in BENCHMARKS if b.split(".")[0] == name]
        if name not in BENCHMARKS and not group:
            raise cli.UserError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} or a "
                                "group (train, decode, convert, eval)")
        out += [b for b in (group or [name]) if b not in out]
    return out


def _numbers(flag) -> list:
    kind = float if flag.name in ("thresholds", "deltas", "mechanism_thresholds", "gate_scales",
                                  "row_thresholds", "serve_rates", "serve_thresholds") else int
    try:
        return [None if v == "none" and flag.name == "serve_thresholds" else kind(v) for v in flag.value]
    except ValueError:
        raise cli.UserError(f"--{flag.name}={','.join(flag.value)}: expected numbers") from None


def _run(name: str):
    """The `Result` of benchmark `name` with the flags' settings."""
    from ouro_jax.benchmarks import convert, decode, decode_split, eval_sweep, serve, sft, train

    sizes = dict(batch=_BATCH.value, seq_len=_SEQ_LEN.value, beta=_BETA.value, shape=_SHAPE.value)
    layout = dict(remat_policy=_REMAT_POLICY.value, scan_layers=_SCAN_LAYERS.value)
    repeats = _REPEATS.value
    tokens = dict(prompt_len=_PROMPT_LEN.value, new_tokens=_NEW_TOKENS.value, shape=_SHAPE.value)
    return {
        "train.compile": lambda: train.compile_time(repeats=repeats, **sizes),
        "train.memory": lambda: train.memory(**sizes),
        "train.fwd_bwd": lambda: train.fwd_bwd(repeats=repeats, **sizes, **layout),
        "train.step": lambda: train.step(repeats=repeats, **sizes, **layout),
        "train.sft": lambda: sft.sft_vs_pretraining(steps=_SFT_STEPS.value, batch=_BATCH.value,
                                                    seq_len=_SEQ_LEN.value, shape=_SHAPE.value),
        "decode.speed": lambda: decode.speed(repeats=repeats, batches=_numbers(_BATCHES), **tokens),
        "decode.cache": lambda: decode.cache(repeats=repeats, **tokens),
        "decode.exit": lambda: decode.exit_policies(
            repeats=repeats, run_dir=_RUN_DIR.value, train_steps=_TRAIN_STEPS.value, examples=_EXAMPLES.value,
            batches=_numbers(_EXIT_BATCHES), thresholds=_numbers(_THRESHOLDS), deltas=_numbers(_DELTAS),
            mechanism_thresholds=tuple(_numbers(_MECHANISM_THRESHOLDS)), shape=_SHAPE.value),
        "decode.rows": lambda: decode.rows(repeats=repeats, batches=_numbers(_ROW_BATCHES),
                                           gate_scales=_numbers(_GATE_SCALES),
                                           thresholds=_numbers(_ROW_THRESHOLDS), **tokens),
        "decode.split": lambda: decode_split.split(repeats=repeats, batches=_numbers(_BATCHES), **tokens),
        "serve": lambda: serve.serve(
            backends=_SERVE_BACKENDS.value, rates=_numbers(_SERVE_RATES),
            thresholds=_numbers(_SERVE_THRESHOLDS),
            num_requests=_SERVE_REQUESTS.value, prompt_lens=tuple(_numbers(_SERVE_PROMPT_LENS)),
            output_lens=tuple(_numbers(_SERVE_OUTPUT_LENS)), max_slots=_MAX_SLOTS.value,
            gate_scale=_GATE_SCALE.value, preset=_SHAPE.value),
        "convert.roundtrip": lambda: convert.roundtrip(preset=_PRESET.value, dtype=_DTYPE.value,
                                                       workdir=_WORKDIR.value, keep=_KEEP.value),
        "eval.sweep": lambda: eval_sweep.sweep(
            docs=_EVAL_DOCS.value, max_loops=_EVAL_LOOPS.value, trained_loops=_EVAL_TRAINED.value,
            hidden_size=_EVAL_HIDDEN.value, layers=_EVAL_LAYERS.value, batch_size=_EVAL_BATCH.value,
            repeats=repeats),
    }[name]()


def _check_serve() -> None:
    """The serve flags, checked before anything loads."""
    from ouro_jax.serve.server import BACKENDS

    unknown = [b for b in _SERVE_BACKENDS.value if b not in (*BACKENDS, "hf")]
    if unknown or not _SERVE_BACKENDS.value:
        choices = ", ".join((*BACKENDS, "hf"))
        raise cli.UserError(f"--serve_backends: unknown {unknown}; choose from {choices}")
    for flag in (_SERVE_PROMPT_LENS, _SERVE_OUTPUT_LENS):
        low_high = _numbers(flag)
        if len(low_high) != 2 or not 1 <= low_high[0] <= low_high[1]:
            raise cli.UserError(f"--{flag.name}={','.join(flag.value)}: expected LOW,HIGH with "
                                "1 <= LOW <= HIGH")
    if any(r <= 0 for r in _numbers(_SERVE_RATES)) or not _SERVE_RATES.value:
        raise cli.UserError(f"--serve_rates={','.join(_SERVE_RATES.value)}: rates must be > 0")
    if any(q is not None and not 0 <= q <= 1 for q in _numbers(_SERVE_THRESHOLDS)):
        raise cli.UserError(f"--serve_thresholds={','.join(_SERVE_THRESHOLDS.value)}: q must lie in [0, 1]")
    if _SERVE_REQUESTS.value < 1 or _MAX_SLOTS.value < 1:
        raise cli.UserError("--serve_requests and --max_slots must be >= 1")


def main(argv):
    del argv
    names = selected(_BENCH.value)
    for flag in (_BATCHES, _EXIT_BATCHES, _THRESHOLDS, _DELTAS, _MECHANISM_THRESHOLDS, _ROW_BATCHES,
                 _GATE_SCALES, _ROW_THRESHOLDS, _SERVE_RATES, _SERVE_THRESHOLDS, _SERVE_PROMPT_LENS,
                 _SERVE_OUTPUT_LENS):
        _numbers(flag)  # refuse bad numbers before anything runs
    if "serve" in names:
        _check_serve()
    if _REPEATS.value < 1:
        raise cli.UserError(f"--repeats={_REPEATS.value} must be >= 1")
    from ouro_jax.benchmarks import common

    env = common.environment()
    print(f"jax {env['jax']} on {env['platform']} ({env['device_kind']}), {env['devices']} device(s)")
    for name in names:
        print(f"\n## {name}\n", flush=True)
        result = _run(name)
        print(result.text, flush=True)
        if _JSON.value:
            common.write_json(_JSON.value, name, result, env)
    if _JSON.value:
        print(f"\nfigures: {_JSON.value}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
