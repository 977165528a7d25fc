"""The Ouro decoder layer: RMSNorm, half-split RoPE, MHA/GQA attention, SwiGLU MLP (arXiv:2510.25741 §4.1).

The one layer used by training, evaluation and decoding: attention takes a pluggable `attend(q, k, v)`
(`Attend`): `masked_attention` over the tokens' own sequence (training, evaluation, prefill) or decoding's
attention over a KV cache, and `DecoderLayer.with_kv` also returns the layer's k, v for that cache.

Shapes: B batch, S sequence, D hidden (embed), N query heads, K key/value heads, H head_dim, F mlp.
Every parameter carries logical axis names in its `out_sharding` metadata, from the vocabulary
`vocab, embed, heads, kv_heads, kv (per-head features), mlp, layers`; `ouro_jax.sharding` maps them to
mesh axes. Parameters are created unsharded (`eager_sharding=False`) so a model can be built anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ouro_jax.model.config import OuroConfig


def param_init(config: OuroConfig, names: tuple[str | None, ...]):
    """normal(0, initializer_range) initializer tagged with logical axis `names`."""
    return nnx.with_partitioning(
        nnx.initializers.normal(config.initializer_range), names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """`weight * cast(x * rsqrt(mean(x^2) + eps))`, statistics in float32 (no `1 + w` offset)."""

    def __init__(self, config: OuroConfig):
        self.eps = config.rms_norm_eps
        self.weight = nnx.Param(jnp.ones((config.hidden_size,), config.param_jnp_dtype),
                                out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D] in x.dtype."""
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, ...]:
    """Half-split RoPE tables. positions [B, S] int -> cos, sin [B, S, 1, H] in `dtype`.

    inv_freq[j] = theta^(-2j/H) for j < H/2; angles are computed in float32 and repeated over both
    halves, as in the released code.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, heads, H] rotated by the half-split (rotate_half) convention."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_mask(segment_ids: jax.Array | None) -> jax.Array | None:
    """Causal mask restricted to equal segment ids. segment_ids [B, S] -> [B, 1, S, S] bool, or None
    when there is a single document per row (attention then uses its built-in causal mask)."""
    if segment_ids is None:
        return None
    seq = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), jnp.bool_))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


# attend(q [B, S, N, H], k, v [B, S, K, H]) -> context [B, S, N, H]: the attention of the S queries over
# the S new keys and whatever keys the caller holds besides (a decoding cache), scale H^-1/2.
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def masked_attention(config: OuroConfig, mask: jax.Array | None = None) -> Attend:
    """`Attend` over the tokens' own sequence: `jax.nn.dot_product_attention` under `mask`
    [B, 1, S, S] bool (None: causal), with the kernel `config.attention_impl`."""
    return functools.partial(
        jax.nn.dot_product_attention, mask=mask, is_causal=mask is None, scale=config.head_dim ** -0.5,
        implementation=None if config.attention_impl == "auto" else config.attention_impl)


class Attention(nnx.Module):
    """Bias-free multi-head / grouped-query attention with RoPE on q and k."""

    def __init__(self, config: OuroConfig, *, rngs: nnx.Rngs):
        d, n, k, h = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                      config.head_dim)
        self.config = config
        common = dict(dtype=config.compute_jnp_dtype, param_dtype=config.param_jnp_dtype, rngs=rngs)
        # Projections act on tokens flattened to [B*S, ...]: plain 2-D matmuls, whose weight
        # gradients XLA:CPU computes without transposing copies.
        self.q_proj = nnx.Einsum("md,dnh->mnh", (d, n, h),
                                 kernel_init=param_init(config, ("embed", "heads", "kv")), **common)
        self.k_proj = nnx.Einsum("md,dnh->mnh", (d, k, h),
                                 kernel_init=param_init(config, ("embed", "kv_heads", "kv")), **common)
        self.v_proj = nnx.Einsum("md,dnh->mnh", (d, k, h),
                                 kernel_init=param_init(config, ("embed", "kv_heads", "kv")), **common)
        # jnp.einsum contracts its letters in sorted order: n (heads) before x (features per head)
        # contracts [N, H] as one flat axis, where "nh" would transpose the kernel and the context.
        self.o_proj = nnx.Einsum("mnx,nxd->md", (n, h, d),
                                 kernel_init=param_init(config, ("heads", "kv", "embed")), **common)
        self.qkv_kernel = nnx.data(None)  # [D, N + 2K, H] once `fuse` has run

    def fuse(self) -> None:
        """Concatenate the q, k, v kernels in the compute dtype into `qkv_kernel`, so that `__call__`
        projects with one matmul instead of three (the same arithmetic). For a caller that applies the
        layer many times with fixed weights (decoding), once outside its loops. The parameters stay
        q_proj / k_proj / v_proj: training never fuses (heads and kv_heads may be sharded apart)."""
        kernels = [proj.kernel[...] for proj in (self.q_proj, self.k_proj, self.v_proj)]
        self.qkv_kernel = jnp.concatenate(kernels, axis=1).astype(self.q_proj.dtype)

    def __call__(self, x, cos, sin, attend: Attend | None = None):
        """x [B, S, D]; cos, sin [B, S, 1, H]; attend: `Attend` (None: causal `masked_attention`)
        -> (out [B, S, D], (k, v) [B, S, K, H] of these tokens, after RoPE)."""
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        if self.qkv_kernel is None:
            q, k, v = (proj(tokens) for proj in (self.q_proj, self.k_proj, self.v_proj))
        else:
            n, kv = self.q_proj.kernel.shape[1], self.k_proj.kernel.shape[1]
            q, k, v = jnp.split(jnp.einsum("md,dnh->mnh", tokens, self.qkv_kernel), [n, n + kv], axis=1)
        q, k, v = (y.reshape(b, s, *y.shape[1:]) for y in (q, k, v))
        q = checkpoint_name(apply_rope(q, cos, sin), "query_proj")
        k = checkpoint_name(apply_rope(k, cos, sin), "key_proj")
        v = checkpoint_name(v, "value_proj")
        attend = masked_attention(self.config) if attend is None else attend
        context = checkpoint_name(attend(q, k, v), "context").reshape(b * s, *q.shape[2:])
        return self.o_proj(context).reshape(b, s, d), (k, v)


class MLP(nnx.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), bias-free."""

    def __init__(self, config: OuroConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        common = dict(use_bias=False, dtype=config.compute_jnp_dtype, param_dtype=config.param_jnp_dtype,
                      rngs=rngs)
        self.gate_proj = nnx.Linear(d, f, kernel_init=param_init(config, ("embed", "mlp")), **common)
        self.up_proj = nnx.Linear(d, f, kernel_init=param_init(config, ("embed", "mlp")), **common)
        self.down_proj = nnx.Linear(f, d, kernel_init=param_init(config, ("mlp", "embed")), **common)
        self.gate_up_kernel = nnx.data(None)  # [D, 2F] once `fuse` has run

    def fuse(self) -> None:
        """Concatenate the gate and up kernels in the compute dtype into `gate_up_kernel`: one matmul
        instead of two in `__call__` (see `Attention.fuse`)."""
        kernels = [proj.kernel[...] for proj in (self.gate_proj, self.up_proj)]
        self.gate_up_kernel = jnp.concatenate(kernels, axis=1).astype(self.gate_proj.dtype)

    def __call__(self, x):
        """x [B, S, D] -> [B, S, D] (computed on tokens flattened to [B*S, D])."""
        tokens = x.reshape(-1, x.shape[-1])
        if self.gate_up_kernel is None:
            gate, up = self.gate_proj(tokens), self.up_proj(tokens)
        else:
            gate, up = jnp.split(tokens @ self.gate_up_kernel, 2, axis=-1)
        hidden = jax.nn.silu(checkpoint_name(gate, "mlp_gate")) * checkpoint_name(up, "mlp_up")
        return self.down_proj(hidden).reshape(x.shape)


class DecoderLayer(nnx.Module):
    """Sandwich-norm block in the released order:
    x += input_layernorm_2(attn(input_layernorm(x)));
    x += post_attention_layernorm_2(mlp(post_attention_layernorm(x)))."""

    def __init__(self, config: OuroConfig, *, rngs: nnx.Rngs):
        self.self_attn = Attention(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.input_layernorm = RMSNorm(config)
        self.input_layernorm_2 = RMSNorm(config)
        self.post_attention_layernorm = RMSNorm(config)
        self.post_attention_layernorm_2 = RMSNorm(config)

    def fuse(self) -> DecoderLayer:
        """Fuse the q/k/v and gate/up matmuls (`Attention.fuse`, `MLP.fuse`); returns the layer."""
        self.self_attn.fuse()
        self.mlp.fuse()
        return self

    def __call__(self, x, cos, sin, attend: Attend | None = None) -> jax.Array:
        """x [B, S, D]; cos, sin [B, S, 1, H]; attend: `Attend` (None: causal) -> [B, S, D]."""
        return self.with_kv(x, cos, sin, attend)[0]

    def with_kv(self, x, cos, sin, attend: Attend | None = None):
        """As `__call__`, also returning the layer's (k, v) [B, S, K, H] (after RoPE) for a KV cache."""
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, attend)
        x = x + self.input_layernorm_2(attn)
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x))), kv


def remat_policy(name: str):
    """The `jax.checkpoint` policy for a `REMAT_POLICIES` name; None means no checkpointing.

    none: keep every activation (fastest, most memory); full: keep only the layer input and recompute
    the layer; dots: keep every matmul output; dots_no_batch: keep weight matmuls but not attention
    scores; save_qkv: keep the q/k/v projections; save_qkv_context: also the attention output.
    """
    policies = jax.checkpoint_policies
    return {
        "none": None,
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "save_qkv": policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
        "save_qkv_context": policies.save_only_these_names(
            "query_proj", "key_proj", "value_proj", "context"),
    }[name]
