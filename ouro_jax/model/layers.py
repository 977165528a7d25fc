"""The Ouro decoder layer: RMSNorm, half-split RoPE, MHA/GQA attention, SwiGLU MLP (ouro_spec.md §1.2).

Shapes: B batch, S sequence, D hidden (embed), N query heads, K key/value heads, H head_dim, F mlp.
Every parameter carries logical axis names in its `out_sharding` metadata, from the vocabulary
`vocab, embed, heads, kv_heads, kv (per-head features), mlp, layers`; `ouro_jax.sharding` maps them to
mesh axes. Parameters are created unsharded (`eager_sharding=False`) so a model can be built anywhere.
"""

from __future__ import annotations

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
        self.weight = nnx.Param(jnp.ones((config.hidden_size,), config.params_dtype),
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


class Attention(nnx.Module):
    """Bias-free multi-head / grouped-query attention with RoPE on q and k."""

    def __init__(self, config: OuroConfig, *, rngs: nnx.Rngs):
        d, n, k, h = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                      config.head_dim)
        self.scale = h ** -0.5
        self.implementation = None if config.attention_impl == "auto" else config.attention_impl
        common = dict(dtype=config.compute_dtype, param_dtype=config.params_dtype, rngs=rngs)
        # Projections act on tokens flattened to [B*S, ...]: plain 2-D matmuls, whose weight
        # gradients XLA:CPU computes without transposing copies.
        self.q_proj = nnx.Einsum("md,dnh->mnh", (d, n, h),
                                 kernel_init=param_init(config, ("embed", "heads", "kv")), **common)
        self.k_proj = nnx.Einsum("md,dnh->mnh", (d, k, h),
                                 kernel_init=param_init(config, ("embed", "kv_heads", "kv")), **common)
        self.v_proj = nnx.Einsum("md,dnh->mnh", (d, k, h),
                                 kernel_init=param_init(config, ("embed", "kv_heads", "kv")), **common)
        self.o_proj = nnx.Einsum("mnh,nhd->md", (n, h, d),
                                 kernel_init=param_init(config, ("heads", "kv", "embed")), **common)

    def __call__(self, x, cos, sin, mask):
        """x [B, S, D]; cos, sin [B, S, 1, H]; mask [B, 1, S, S] bool or None (causal) -> [B, S, D]."""
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        project = lambda proj: proj(tokens).reshape(b, s, *proj.kernel.shape[1:])
        q = checkpoint_name(apply_rope(project(self.q_proj), cos, sin), "query_proj")
        k = checkpoint_name(apply_rope(project(self.k_proj), cos, sin), "key_proj")
        v = checkpoint_name(project(self.v_proj), "value_proj")
        context = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=mask is None, scale=self.scale,
            implementation=self.implementation)
        context = checkpoint_name(context, "context").reshape(b * s, *context.shape[2:])
        return self.o_proj(context).reshape(b, s, d)


class MLP(nnx.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), bias-free."""

    def __init__(self, config: OuroConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        common = dict(use_bias=False, dtype=config.compute_dtype, param_dtype=config.params_dtype,
                      rngs=rngs)
        self.gate_proj = nnx.Linear(d, f, kernel_init=param_init(config, ("embed", "mlp")), **common)
        self.up_proj = nnx.Linear(d, f, kernel_init=param_init(config, ("embed", "mlp")), **common)
        self.down_proj = nnx.Linear(f, d, kernel_init=param_init(config, ("mlp", "embed")), **common)

    def __call__(self, x):
        """x [B, S, D] -> [B, S, D] (computed on tokens flattened to [B*S, D])."""
        tokens = x.reshape(-1, x.shape[-1])
        hidden = jax.nn.silu(checkpoint_name(self.gate_proj(tokens), "mlp_gate")) * checkpoint_name(
            self.up_proj(tokens), "mlp_up")
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

    def __call__(self, x, cos, sin, mask):
        """x [B, S, D] -> [B, S, D]."""
        x = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))


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
