"""The looped Ouro model: embed -> T x [N shared layers -> model.norm] -> exit gate + LM head per loop.

The N distinct decoder layers are stored stacked (leading `layers` axis) and applied with an inner
`jax.lax.scan`; the T recurrent loops are an outer `jax.lax.scan` that closes over the same parameters,
so neither compile time nor parameter count grows with N or T (arXiv:2510.25741 Eq. 1). After every
loop `model.norm` is applied and the normed state is (a) carried into the next loop, (b) read by the exit
gate, (c) read by the LM head, as in the released code. Loops are numbered 1..T; the leading axis of
per-loop outputs holds loop t at index t - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ouro_jax.model import exits
from ouro_jax.model.config import OuroConfig
from ouro_jax.model.layers import (
    Attend,
    DecoderLayer,
    RMSNorm,
    param_init,
    remat_policy,
    rope_cos_sin,
    sequence_attention,
)
from ouro_jax.sharding import constrain


@struct.dataclass
class OuroOutput:
    """Evaluation-path output (all T loops materialised, loop t at index t - 1).

    logits [T, B, S, V] float32; gate_logits [T, B, S] float32; exit_pdf [T, B, S] float32;
    hidden_states [T, B, S, D] (the normed state after each loop, compute dtype).
    """

    logits: jax.Array
    gate_logits: jax.Array
    exit_pdf: jax.Array
    hidden_states: jax.Array


class Ouro(nnx.Module):
    """Ouro / LoopLM causal language model.

    Parameters mirror the released state dict (`embed_tokens`, `layers.*`, `norm`, `early_exit_gate`,
    `lm_head`); `layers` holds the N decoder layers stacked on a leading axis.
    """

    def __init__(self, config: OuroConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, v = config.hidden_size, config.vocab_size
        dtypes = dict(dtype=config.compute_jnp_dtype, param_dtype=config.param_jnp_dtype)
        self.embed_tokens = nnx.Embed(v, d, embedding_init=param_init(config, ("vocab", "embed")),
                                      rngs=rngs, **dtypes)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=rngs)

        self.layers = stacked_layers(rngs)
        self.norm = RMSNorm(config)
        self.early_exit_gate = nnx.Linear(
            d, 1, kernel_init=param_init(config, ("embed", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, (None,), eager_sharding=False),
            rngs=rngs, **dtypes)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                d, v, use_bias=False, kernel_init=param_init(config, ("embed", "vocab")),
                preferred_element_type=jnp.float32, rngs=rngs, **dtypes)

    # --- per-loop readouts ---------------------------------------------------------------------
    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on a normed state. hidden [B, S, D] -> logits [B, S, V] float32."""
        if self.config.tie_word_embeddings:
            table = self.embed_tokens.embedding[...].astype(hidden.dtype)
            logits = jnp.einsum("bsd,vd->bsv", hidden, table, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        return constrain(logits, ("batch", None, "vocab"))

    def gate_logit(self, hidden: jax.Array) -> jax.Array:
        """Exit gate on a normed state. hidden [B, S, D] -> [B, S] float32 (pre-sigmoid)."""
        return self.early_exit_gate(hidden)[..., 0].astype(jnp.float32)

    # --- the loop ------------------------------------------------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, S] int -> [B, S, D] in the compute dtype (no sqrt(D) scaling)."""
        return constrain(self.embed_tokens(input_ids).astype(self.config.compute_jnp_dtype),
                         ("batch", None, None))

    def apply_layers(self, hidden, cos, sin, attend: Attend | None = None) -> jax.Array:
        """One pass through the N stacked layers (a scan, or unrolled; optional remat per layer).

        hidden [B, S, D]; cos, sin [B, S, 1, H]; attend: the layers' `Attend` (None: causal) -> [B, S, D].
        """
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(h, layer_params):
            return nnx.merge(graphdef, layer_params)(h, cos, sin, attend), None

        policy = remat_policy(self.config.remat_policy)
        if policy is not None:
            one_layer = jax.checkpoint(one_layer, policy=policy, prevent_cse=False)
        if self.config.scan_layers:
            return jax.lax.scan(one_layer, hidden, stacked)[0]
        for i in range(self.config.num_hidden_layers):
            hidden, _ = one_layer(hidden, jax.tree.map(lambda x, i=i: x[i], stacked))
        return hidden

    def unstacked_layers(self) -> list[DecoderLayer]:
        """The N layers as separate modules (parameters sliced off the stack), for code that addresses
        each layer statically, such as decoding with one KV-cache slot per (loop, layer)."""
        graphdef, stacked = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked))
                for i in range(self.config.num_hidden_layers)]

    def loop(
        self,
        input_ids: jax.Array,
        readout: Callable[[jax.Array], Any],
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        num_loops: int | None = None,
        remat_readout: bool = False,
        detach_gate_input: bool = False,
    ) -> tuple[Any, jax.Array]:
        """Run T recurrent loops and read each loop's normed state.

        Args:
          input_ids: [B, S] token ids.
          readout: `f(hidden [B, S, D]) -> pytree`, applied to every loop's normed state inside the
            recurrence (so e.g. a loss never holds T loops of logits at once).
          positions: [B, S] RoPE positions; default 0..S-1 per row (restart them per packed document).
          segment_ids: [B, S] document ids of packed rows; tokens attend only within their segment.
          num_loops: T, defaults to `config.total_ut_steps`.
          remat_readout: recompute `readout` in the backward pass instead of storing its residuals
            (stores only the [B, S, D] state per loop).
          detach_gate_input: stop gradients from the gate into the LM (Stage II).

        Returns:
          (readout outputs stacked on a leading T axis, gate_logits [T, B, S] float32).
        """
        cfg = self.config
        num_loops = cfg.total_ut_steps if num_loops is None else num_loops
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        cos, sin = (constrain(x, ("batch", None, None, None))
                    for x in rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.compute_jnp_dtype))
        attend = sequence_attention(cfg, segment_ids)
        if remat_readout:
            readout = jax.checkpoint(readout, prevent_cse=False)

        def one_loop(hidden, _):
            hidden = constrain(self.norm(self.apply_layers(hidden, cos, sin, attend)), ("batch", None, None))
            gate_in = jax.lax.stop_gradient(hidden) if detach_gate_input else hidden
            return hidden, (readout(hidden), self.gate_logit(gate_in))

        _, (outputs, gate_logits) = jax.lax.scan(one_loop, self.embed(input_ids), None, length=num_loops)
        return outputs, gate_logits

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        num_loops: int | None = None,
    ) -> OuroOutput:
        """Evaluation forward: every loop's logits [T, B, S, V] and the exit distribution [T, B, S]."""
        (logits, hidden), gate_logits = self.loop(
            input_ids, lambda h: (self.logits(h), h), positions=positions,
            segment_ids=segment_ids, num_loops=num_loops)
        return OuroOutput(logits=logits, gate_logits=gate_logits,
                          exit_pdf=exits.exit_pdf(gate_logits), hidden_states=hidden)


def num_params(model: nnx.Module) -> int:
    """Number of scalar parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
