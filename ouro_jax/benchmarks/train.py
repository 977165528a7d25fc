"""Training benchmarks: compile time, gradient memory and speed of the Stage I objective
(arXiv:2510.25741 §3.3, Eq. 4) at the CPU benchmark shape (`model.config.cpu_benchmark`).

  train.compile   trace + lower + compile time of the Stage I gradient for (N=24, T=4) vs (N=2, T=1).
  train.memory    compiled peak temporary memory of the Stage I gradient vs T (remat full): per-loop CE
                  computed inside the loop vs all T loops of logits materialised.
  train.fwd_bwd   forward + backward tokens/s, ouro_jax (jit) next to the same weights and loss in
                  PyTorch eager on the exported modeling code (needs the [torch] extra), in one run.
  train.step      one optimiser step (Stage I loss, gradients, clipping 1.0, AdamW 0.9/0.95, weight
                  decay 0.1): ouro_jax's jitted train step next to the same model, loss and optimiser in
                  PyTorch eager.

Ratios are measured side by side in one process; report absolute figures only from an accelerator.
Why XLA:CPU trails PyTorch here: its backward pass (matmul transposes, scan residual buffers, unfused
elementwise chains) is slower than oneDNN's kernels at this small shape; forward and loss agree.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ouro_jax import objective
from ouro_jax.benchmarks.common import Result, median_seconds, model_config, table
from ouro_jax.model import config as configs
from ouro_jax.model.ouro import Ouro


def _abstract_grad_fn(config: configs.OuroConfig, batch: int, seq_len: int, beta: float,
                      materialise: bool = False):
    """A jitted Stage I value-and-grad and abstract (params, batch) arguments for lowering; batch
    input_ids / targets [batch, seq_len] int32."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0))))
    spec = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def loss(p, b):
        model = nnx.merge(graphdef, p)
        if materialise:  # the naive path: all T loops of logits [T, B, S, V], then the loss
            out = model(b["input_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, b["targets"][None])
            return jnp.mean(objective.stage1_token_loss(ce, out.gate_logits, beta))
        return objective.stage1_loss(model, b, beta=beta)[0]

    return jax.jit(jax.value_and_grad(loss)), (params, {"input_ids": spec, "targets": spec})


def compile_time(*, repeats: int, batch: int = 8, seq_len: int = 256, beta: float = 0.1,
                 shape: str = "cpu_benchmark") -> Result:
    """Median compile seconds of the Stage I gradient (a fresh function each time) for N layers x T
    loops in {2, 24} x {1, 4}; goal: (N=24, T=4) / (N=2, T=1) <= 1.5x (layers and loops are scanned)."""

    def seconds(layers: int, loops: int) -> float:
        config = model_config(shape, num_hidden_layers=layers, total_ut_steps=loops)
        fn, args = _abstract_grad_fn(config, batch, seq_len, beta)
        start = time.perf_counter()
        fn.lower(*args).compile()
        return time.perf_counter() - start

    seconds(2, 1)  # warm up XLA itself
    results = {(n, t): statistics.median(seconds(n, t) for _ in range(repeats))
               for n, t in [(2, 1), (2, 4), (24, 1), (24, 4)]}
    ratio = results[24, 4] / results[2, 1]
    text = (table(["layers N", "loops T", "compile s (median)"],
                  [[n, t, f"{s:.2f}"] for (n, t), s in results.items()])
            + f"\n\nratio (N=24, T=4) / (N=2, T=1): {ratio:.2f}x (goal <= 1.5x)")
    compile_s = [{"layers": n, "loops": t, "seconds": s} for (n, t), s in results.items()]
    return Result(text, {"compile_s": compile_s, "ratio": ratio, "batch": batch, "seq_len": seq_len,
                         "repeats": repeats})


def memory(*, batch: int = 8, seq_len: int = 256, beta: float = 0.1, shape: str = "cpu_benchmark") -> Result:
    """Compiled temporary bytes of the Stage I gradient (remat full) for T = 1, 2, 4, 8, in-loop CE vs
    materialised logits, next to the size of one loop's float32 logits [B, S, V]."""
    rows, figures = [], []
    one_loop = None
    for loops in (1, 2, 4, 8):
        config = model_config(shape, total_ut_steps=loops, remat_policy="full")
        one_loop = batch * seq_len * config.vocab_size * 4
        temps = []
        for materialise in (False, True):
            fn, args = _abstract_grad_fn(config, batch, seq_len, beta, materialise)
            temps.append(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
        rows.append([loops, f"{temps[0] / 2**20:.0f}", f"{temps[1] / 2**20:.0f}", f"{one_loop / 2**20:.0f}"])
        figures.append({"loops": loops, "in_loop_ce_temp_bytes": temps[0],
                        "materialised_temp_bytes": temps[1]})
    text = table(["T", "in-loop CE temp MiB", "materialised logits temp MiB", "one loop of logits MiB"], rows)
    return Result(text, {"temp_bytes": figures, "one_loop_logits_bytes": one_loop, "batch": batch,
                         "seq_len": seq_len})


def _torch_stage1_loss(model, input_ids, targets, beta: float):
    """The same Stage I loss in PyTorch eager on the exported modeling code (all loops' logits)."""
    import torch
    import torch.nn.functional as F

    out = model.model(input_ids=input_ids, use_cache=False)
    hidden = out.hidden_states_per_step  # [T, B, S, D]
    logits = model.lm_head(hidden).float()  # [T, B, S, V]
    loops = logits.shape[0]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.repeat(loops, 1).reshape(-1),
                         reduction="none").reshape(loops, *targets.shape)
    g = out.gate_logits.float()  # [T, B, S]
    log_lam, log_one_minus = F.logsigmoid(g), F.logsigmoid(-g)
    log_surv_before = torch.cat([torch.zeros_like(g[:1]), torch.cumsum(log_one_minus, 0)[:-1]])
    log_exit_here = torch.cat([log_lam[:-1], torch.zeros_like(g[:1])])
    log_p = log_surv_before + log_exit_here
    p = log_p.exp()
    token_loss = (p * ce).sum(0) + beta * (p * log_p).sum(0)
    return token_loss.mean()


def _model_and_batch(batch: int, seq_len: int, remat_policy: str, scan_layers: bool, shape: str):
    """(Ouro at `shape` (`common.model_config`), token ids [batch, seq_len + 1] int64)."""
    config = model_config(shape, remat_policy=remat_policy, scan_layers=scan_layers)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len + 1))
    return Ouro(config, rngs=nnx.Rngs(0)), ids


def _torch_row(name: str, seconds: float, tokens: int, loss: float) -> list:
    import torch

    return [f"PyTorch {torch.__version__} {name} ({torch.get_num_threads()} threads)", f"{seconds:.3f}",
            f"{tokens / seconds:,.0f}", f"{loss:.5f}"]


def fwd_bwd(*, repeats: int, batch: int = 8, seq_len: int = 256, remat_policy: str = "none",
            scan_layers: bool = True, beta: float = 0.1, shape: str = "cpu_benchmark") -> Result:
    """Stage I forward + backward tokens/s: ouro_jax (jit) vs PyTorch eager, same weights."""
    import torch

    from ouro_jax.convert.hf import to_torch

    model, ids = _model_and_batch(batch, seq_len, remat_policy, scan_layers, shape)
    graphdef, params = nnx.split(model)
    jbatch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: objective.stage1_loss(nnx.merge(graphdef, p), b, beta=beta)[0]))
    jax_loss = float(grad_fn(params, jbatch)[0])
    jax_s = median_seconds(lambda: jax.block_until_ready(grad_fn(params, jbatch)), repeats)

    tmodel = to_torch(model).train()
    tids, ttargets = torch.as_tensor(ids[:, :-1]), torch.as_tensor(ids[:, 1:])

    def torch_step():
        tmodel.zero_grad(set_to_none=True)
        loss = _torch_stage1_loss(tmodel, tids, ttargets, beta)
        loss.backward()
        return loss

    torch_loss = float(torch_step().detach())
    torch_s = median_seconds(torch_step, repeats)
    tokens = batch * seq_len
    text = (table(["implementation", "fwd+bwd s", "tokens/s", "loss"],
                  [["ouro_jax (jit, XLA:CPU)", f"{jax_s:.3f}", f"{tokens / jax_s:,.0f}", f"{jax_loss:.5f}"],
                   _torch_row("eager", torch_s, tokens, torch_loss)])
            + f"\n\nouro_jax / PyTorch tokens/s: {torch_s / jax_s:.2f}x")
    return Result(text, {"ouro_jax_s": jax_s, "torch_s": torch_s, "ouro_jax_tokens_per_s": tokens / jax_s,
                         "torch_tokens_per_s": tokens / torch_s, "speedup": torch_s / jax_s,
                         "ouro_jax_loss": jax_loss, "torch_loss": torch_loss, "batch": batch,
                         "seq_len": seq_len, "remat_policy": remat_policy, "scan_layers": scan_layers,
                         "repeats": repeats})


def step(*, repeats: int, batch: int = 8, seq_len: int = 256, remat_policy: str = "none",
         scan_layers: bool = True, beta: float = 0.1, shape: str = "cpu_benchmark") -> Result:
    """One optimiser step (Stage I, clip 1.0, AdamW 0.9/0.95, wd 0.1): ouro_jax vs PyTorch eager."""
    import torch

    from ouro_jax.convert.hf import to_torch
    from ouro_jax.train import optimizer as optim
    from ouro_jax.train.step import TrainState, make_train_step

    model, ids = _model_and_batch(batch, seq_len, remat_policy, scan_layers, shape)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    opt = dict(learning_rate=3e-4, warmup_steps=0, decay_steps=0, min_lr_ratio=1.0, schedule="constant",
               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    tx = optim.make_optimizer(opt, 1000, params, stage=1)
    train_step = jax.jit(make_train_step(graphdef, tx, optim.learning_rate_schedule(opt, 1000),
                                         {"stage": 1, "beta": beta}, optim.trainable_mask(params, 1)),
                         donate_argnums=0)
    train_state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(0))
    jbatch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}

    tmodel = to_torch(model).train()
    decay = [p for n, p in tmodel.named_parameters() if "norm" not in n and not n.endswith("gate.bias")]
    no_decay = [p for n, p in tmodel.named_parameters() if "norm" in n or n.endswith("gate.bias")]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}], lr=3e-4, betas=(0.9, 0.95),
                             eps=1e-8)
    tids, ttargets = torch.as_tensor(ids[:, :-1]), torch.as_tensor(ids[:, 1:])

    def torch_step():
        topt.zero_grad(set_to_none=True)
        loss = _torch_stage1_loss(tmodel, tids, ttargets, beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        topt.step()
        return loss.detach()

    def jax_step():
        nonlocal train_state
        train_state, metrics = train_step(train_state, jbatch)
        return jax.block_until_ready(metrics["loss"])

    jax_loss, torch_loss = float(jax_step()), float(torch_step())
    jax_s = median_seconds(jax_step, repeats)
    torch_s = median_seconds(torch_step, repeats)
    tokens = batch * seq_len
    text = (table(["implementation", "step s", "tokens/s", "first-step loss"],
                  [["ouro_jax train step (jit, XLA:CPU)", f"{jax_s:.3f}", f"{tokens / jax_s:,.0f}",
                    f"{jax_loss:.5f}"], _torch_row("eager + AdamW", torch_s, tokens, torch_loss)])
            + f"\n\nouro_jax / PyTorch training tokens/s: {torch_s / jax_s:.2f}x (goal >= 1.2x)")
    return Result(text, {"ouro_jax_s": jax_s, "torch_s": torch_s, "ouro_jax_tokens_per_s": tokens / jax_s,
                         "torch_tokens_per_s": tokens / torch_s, "speedup": torch_s / jax_s,
                         "ouro_jax_first_loss": jax_loss, "torch_first_loss": torch_loss, "batch": batch,
                         "seq_len": seq_len, "remat_policy": remat_policy, "scan_layers": scan_layers,
                         "repeats": repeats})
