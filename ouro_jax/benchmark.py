"""Benchmarks: `python -m ouro_jax.benchmark --bench=compile,memory,fwd_bwd [--repeats=5]`.

compile   compile time of the Stage I gradient for (N=24, T=4) vs (N=2, T=1) at hidden 256.
memory    compiled peak temporary memory of the Stage I gradient vs T, in-loop CE vs materialised logits.
fwd_bwd   forward + backward tokens/s at the CPU benchmark shape (DESIGN.md), ouro_jax (jit) next to
          the same weights and loss in PyTorch eager (needs the [torch] extra), in one run.
train     training tokens/s (Stage I loss, gradients, clipping, AdamW update) at the same shape,
          ouro_jax's jitted train step next to the same model, loss and optimiser in PyTorch eager.

Ratios are measured side by side in one process; report absolute figures only from an accelerator.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from ouro_jax import objective
from ouro_jax.model import config as configs
from ouro_jax.model.ouro import Ouro

FLAGS = flags.FLAGS
flags.DEFINE_list("bench", ["compile", "memory", "fwd_bwd", "train"], "Benchmarks to run.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
flags.DEFINE_integer("batch", 8, "Batch size for fwd_bwd.")
flags.DEFINE_integer("seq", 256, "Sequence length for fwd_bwd.")
flags.DEFINE_string("remat_policy", "none", "OuroConfig.remat_policy for fwd_bwd and train.")
flags.DEFINE_bool("scan_layers", True, "OuroConfig.scan_layers for fwd_bwd and train.")
flags.DEFINE_float("beta", 0.1, "Stage I entropy coefficient.")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _abstract_grad_fn(config: configs.OuroConfig, batch: int, seq: int, materialise: bool = False):
    """A jitted Stage I value-and-grad and abstract (params, batch) arguments for lowering."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0))))
    spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(p, b):
        model = nnx.merge(graphdef, p)
        if materialise:  # the naive path: all T steps of logits, then the loss
            out = model(b["input_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, b["targets"][None])
            return jnp.mean(objective.stage1_token_loss(ce, out.gate_logits, FLAGS.beta))
        return objective.stage1_loss(model, b, beta=FLAGS.beta)[0]

    return jax.jit(jax.value_and_grad(loss)), (params, {"input_ids": spec, "targets": spec})


def bench_compile(repeats: int) -> list[str]:
    """Trace + lower + compile time of the Stage I gradient, fresh function per measurement."""

    def compile_seconds(layers: int, steps: int) -> float:
        config = configs.cpu_benchmark(num_hidden_layers=layers, total_ut_steps=steps)
        fn, args = _abstract_grad_fn(config, 8, 256)
        start = time.perf_counter()
        fn.lower(*args).compile()
        return time.perf_counter() - start

    compile_seconds(2, 1)  # warm up XLA itself
    rows = ["| layers N | steps T | compile s (median) |", "|---|---|---|"]
    results = {}
    for layers, steps in [(2, 1), (2, 4), (24, 1), (24, 4)]:
        results[layers, steps] = statistics.median(
            compile_seconds(layers, steps) for _ in range(repeats))
        rows.append(f"| {layers} | {steps} | {results[layers, steps]:.2f} |")
    ratio = results[24, 4] / results[2, 1]
    rows.append(f"\nratio (N=24, T=4) / (N=2, T=1): {ratio:.2f}x (goal <= 1.5x)")
    return rows


def bench_memory() -> list[str]:
    """Compiled temporary memory of the Stage I gradient (remat full) as T grows."""
    batch, seq, vocab = 8, 256, 4096
    one_step = batch * seq * vocab * 4
    rows = ["| T | in-loop CE temp MiB | materialised logits temp MiB | one step of logits MiB |",
            "|---|---|---|---|"]
    for steps in (1, 2, 4, 8):
        config = configs.cpu_benchmark(total_ut_steps=steps, remat_policy="full")
        temps = []
        for materialise in (False, True):
            fn, args = _abstract_grad_fn(config, batch, seq, materialise)
            temps.append(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
        rows.append(f"| {steps} | {temps[0] / 2**20:.0f} | {temps[1] / 2**20:.0f} | "
                    f"{one_step / 2**20:.0f} |")
    return rows


def _torch_stage1_loss(model, input_ids, targets, beta: float):
    """The same Stage I loss in PyTorch eager on the exported modeling code (all steps' logits)."""
    import torch
    import torch.nn.functional as F

    out = model.model(input_ids=input_ids, use_cache=False)
    hidden = out.hidden_states_per_step  # [T, B, S, D]
    logits = model.lm_head(hidden).float()  # [T, B, S, V]
    steps = logits.shape[0]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.repeat(steps, 1).reshape(-1),
                         reduction="none").reshape(steps, *targets.shape)
    g = out.gate_logits.float()  # [T, B, S]
    log_lam, log_one_minus = F.logsigmoid(g), F.logsigmoid(-g)
    log_surv_before = torch.cat([torch.zeros_like(g[:1]), torch.cumsum(log_one_minus, 0)[:-1]])
    log_exit_here = torch.cat([log_lam[:-1], torch.zeros_like(g[:1])])
    log_p = log_surv_before + log_exit_here
    p = log_p.exp()
    token_loss = (p * ce).sum(0) + beta * (p * log_p).sum(0)
    return token_loss.mean()


def bench_fwd_bwd(repeats: int, batch: int, seq: int) -> list[str]:
    """Stage I forward + backward tokens/s: ouro_jax (jit) vs PyTorch eager, same weights."""
    config = configs.cpu_benchmark(remat_policy=FLAGS.remat_policy, scan_layers=FLAGS.scan_layers)
    model = Ouro(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1))
    jbatch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: objective.stage1_loss(nnx.merge(graphdef, p), b, beta=FLAGS.beta)[0]))
    jax_loss = float(grad_fn(params, jbatch)[0])
    jax_s = median_seconds(lambda: jax.block_until_ready(grad_fn(params, jbatch)), repeats)
    tokens = batch * seq
    rows = ["| implementation | step s | tokens/s | loss |", "|---|---|---|---|",
            f"| ouro_jax (jit, XLA:CPU) | {jax_s:.3f} | {tokens / jax_s:,.0f} | {jax_loss:.5f} |"]

    import torch

    from ouro_jax.convert.hf import to_torch

    tmodel = to_torch(model).train()
    tids, ttargets = torch.as_tensor(ids[:, :-1]), torch.as_tensor(ids[:, 1:])

    def torch_step():
        tmodel.zero_grad(set_to_none=True)
        loss = _torch_stage1_loss(tmodel, tids, ttargets, FLAGS.beta)
        loss.backward()
        return loss

    torch_loss = float(torch_step().detach())
    torch_s = median_seconds(torch_step, repeats)
    rows.append(f"| PyTorch {torch.__version__} eager ({torch.get_num_threads()} threads) | "
                f"{torch_s:.3f} | {tokens / torch_s:,.0f} | {torch_loss:.5f} |")
    rows.append(f"\nouro_jax / PyTorch tokens/s: {torch_s / jax_s:.2f}x")
    return rows


def bench_train(repeats: int, batch: int, seq: int) -> list[str]:
    """One optimiser step (Stage I, clip 1.0, AdamW 0.9/0.95, wd 0.1): ouro_jax vs PyTorch eager."""
    from ouro_jax.train import optimizer as optim
    from ouro_jax.train.step import TrainState, make_train_step

    config = configs.cpu_benchmark(remat_policy=FLAGS.remat_policy, scan_layers=FLAGS.scan_layers)
    model = Ouro(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    opt = dict(learning_rate=3e-4, warmup_steps=0, decay_steps=0, min_lr_ratio=1.0, schedule="constant",
               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    tx = optim.make_optimizer(opt, 1000, params, stage=1)
    step = jax.jit(make_train_step(graphdef, tx, optim.learning_rate_schedule(opt, 1000),
                                   {"stage": 1, "beta": FLAGS.beta}, optim.trainable_mask(params, 1)),
                   donate_argnums=0)
    train_state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1))
    jbatch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}

    import torch

    from ouro_jax.convert.hf import to_torch

    tmodel = to_torch(model).train()
    decay = [p for n, p in tmodel.named_parameters() if "norm" not in n and not n.endswith("gate.bias")]
    no_decay = [p for n, p in tmodel.named_parameters() if "norm" in n or n.endswith("gate.bias")]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}], lr=3e-4, betas=(0.9, 0.95),
                             eps=1e-8)
    tids, ttargets = torch.as_tensor(ids[:, :-1]), torch.as_tensor(ids[:, 1:])

    def torch_step():
        topt.zero_grad(set_to_none=True)
        loss = _torch_stage1_loss(tmodel, tids, ttargets, FLAGS.beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        topt.step()
        return loss.detach()

    def jax_step():
        nonlocal train_state
        train_state, metrics = step(train_state, jbatch)
        return jax.block_until_ready(metrics["loss"])

    jax_loss, torch_loss = float(jax_step()), float(torch_step())
    jax_s = median_seconds(jax_step, repeats)
    torch_s = median_seconds(torch_step, repeats)
    tokens = batch * seq
    return ["| implementation | step s | tokens/s | first-step loss |", "|---|---|---|---|",
            f"| ouro_jax train step (jit, XLA:CPU) | {jax_s:.3f} | {tokens / jax_s:,.0f} | {jax_loss:.5f} |",
            f"| PyTorch {torch.__version__} eager + AdamW ({torch.get_num_threads()} threads) | "
            f"{torch_s:.3f} | {tokens / torch_s:,.0f} | {torch_loss:.5f} |",
            f"\nouro_jax / PyTorch training tokens/s: {torch_s / jax_s:.2f}x (goal >= 1.2x)"]


def main(argv):
    del argv
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {len(jax.devices())} device(s)")
    for name in FLAGS.bench:
        print(f"\n## {name}\n")
        if name == "compile":
            rows = bench_compile(FLAGS.repeats)
        elif name == "memory":
            rows = bench_memory()
        elif name == "fwd_bwd":
            rows = bench_fwd_bwd(FLAGS.repeats, FLAGS.batch, FLAGS.seq)
        elif name == "train":
            rows = bench_train(FLAGS.repeats, FLAGS.batch, FLAGS.seq)
        else:
            raise app.UsageError(f"unknown --bench={name}; choose from compile, memory, fwd_bwd, train")
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    app.run(main)
