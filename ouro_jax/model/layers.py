"""The Ouro decoder layer: RMSNorm, half-split RoPE, MHA/GQA attention, SwiGLU MLP (arXiv:2510.25741 §4.1).

The one layer used by training, evaluation and decoding: attention takes a pluggable `attend(q, k, v)`
(`Attend`): `masked_attention` over the tokens' own sequence (training, evaluation, prefill) or decoding's
attention over a KV cache, and `DecoderLayer.with_kv` also returns the layer's k, v for that cache.
`DecoderLayer.fuse` merges the q/k/v and the gate/up matmuls into one each, for callers that apply fixed
weights many times (decoding); the parameters keep the released q/k/v/gate/up split.

Shapes: B batch, S sequence, D hidden (embed), N query heads, K key/value heads, H head_dim, F mlp.
Every parameter carries logical axis names in its `out_sharding` metadata, from the vocabulary
`vocab, embed, heads, kv_heads, kv (per-head features), mlp, layers`; `ouro_jax.sharding` maps them to
mesh axes. Parameters are created unsharded (`eager_sharding=False`) so a model can be built anywhere.
Activations are constrained to logical axes (`batch` for rows) with `sharding.constrain`, which acts
only while a mesh is current (the trainer's jitted steps) and is the identity otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ouro_jax.model.config import OuroConfig
from ouro_jax.sharding import constrain, per_shard

ROWS = ("batch", None, None)  # [B, S, D] activations: rows split over the batch mesh axes


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
    [B, 1, S, S] bool (None: causal), with the kernel `config.attention_impl` ("splash", which needs
    segment ids instead of a mask, uses "xla" here: generation's prefill under a left-padding mask)."""
    impl = {"auto": None, "splash": "xla"}.get(config.attention_impl, config.attention_impl)
    return functools.partial(jax.nn.dot_product_attention, mask=mask, is_causal=mask is None,
                             scale=config.head_dim ** -0.5, implementation=impl)


def splash_attention(config: OuroConfig, segment_ids: jax.Array | None, *, interpret: bool = False) -> Attend:
    """`Attend` over the tokens' own sequence with the TPU Pallas splash kernel: causal attention
    within equal `segment_ids` [B, S] (None: one document per row), computed in blocks with the fully
    masked ones skipped, so no [B, N, S, S] scores exist in the forward or backward pass (the
    paper's 4K-64K contexts, arXiv:2510.25741 §4.1, need this). The kernel runs on TPU (`interpret=True`:
    Pallas' interpreter, any backend); on a mesh each device runs it on its rows (`sharding.per_shard`).
    Its softmax statistics are named "context" for the remat policies. S must be a multiple of 128.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block_fields = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                    "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")

    def local(q, k, v, segments):  # this device's rows: q [b, S, n, H], k, v [b, S, k, H], segments [b, S]
        seq, heads = q.shape[1], q.shape[2]
        block = next((size for size in (512, 256, 128) if seq % size == 0), None)
        if block is None:
            raise ValueError(f"attention_impl='splash' needs a sequence length that is a multiple of 128, "
                             f"got {seq}")
        kernel = splash.make_splash_mha(
            masks.MultiHeadMask([masks.CausalMask((seq, seq))] * heads),
            block_sizes=splash.BlockSizes(**dict.fromkeys(block_fields, block)),
            head_shards=1, q_seq_shards=1, residual_checkpoint_name="context", interpret=interpret)
        row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
        heads_first = lambda x: x.swapaxes(1, 2)
        q = q * config.head_dim ** -0.5
        return heads_first(jax.vmap(row)(heads_first(q), heads_first(k), heads_first(v), segments))

    run = per_shard(local, [("batch", None, "heads", None), ("batch", None, "kv_heads", None),
                            ("batch", None, "kv_heads", None), ("batch", None)])

    def attend(q, k, v):
        segments = segment_ids if segment_ids is not None else jnp.ones(q.shape[:2], jnp.int32)
        return run(q, k, v, segments.astype(jnp.int32))

    return attend


def sequence_attention(config: OuroConfig, segment_ids: jax.Array | None) -> Attend:
    """The `Attend` of training and evaluation: causal within equal `segment_ids` [B, S] (None: one
    document per row), with `config.attention_impl` (the splash kernel, or `masked_attention`)."""
    if config.attention_impl == "splash":
        return splash_attention(config, segment_ids)
    mask = attention_mask(segment_ids)
    return masked_attention(config, None if mask is None else constrain(mask, ("batch", None, None, None)))


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

    def kv(self, x, cos, sin) -> tuple[jax.Array, jax.Array]:
        """Only the keys and values of tokens x [B, S, D] (no queries, no attention): (k, v)
        [B, S, K, H], k after RoPE with cos, sin [B, S, 1, H], from the unfused k_proj / v_proj."""
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        k, v = (proj(tokens).reshape(b, s, *proj.kernel.shape[1:]) for proj in (self.k_proj, self.v_proj))
        return apply_rope(k, cos, sin), v

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
        heads = ("batch", None, "heads", None)
        kv_heads = ("batch", None, "kv_heads", None)
        q = checkpoint_name(constrain(apply_rope(q, cos, sin), heads), "query_proj")
        k = checkpoint_name(constrain(apply_rope(k, cos, sin), kv_heads), "key_proj")
        v = checkpoint_name(constrain(v, kv_heads), "value_proj")
        attend = masked_attention(self.config) if attend is None else attend
        context = checkpoint_name(constrain(attend(q, k, v), heads), "context").reshape(b * s, *q.shape[2:])
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
        gate = constrain(checkpoint_name(gate, "mlp_gate"), ("batch", "mlp"))
        up = constrain(checkpoint_name(up, "mlp_up"), ("batch", "mlp"))
        return constrain(self.down_proj(jax.nn.silu(gate) * up).reshape(x.shape), ROWS)


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

    def kv(self, x, cos, sin) -> tuple[jax.Array, jax.Array]:
        """The (k, v) [B, S, K, H] this layer's attention would cache for input x [B, S, D]: its input
        norm and K/V projections (+RoPE) only, no attention or MLP (CALM's K/V of skipped layers)."""
        return self.self_attn.kv(self.input_layernorm(x), cos, sin)

    def with_kv(self, x, cos, sin, attend: Attend | None = None):
        """As `__call__`, also returning the layer's (k, v) [B, S, K, H] (after RoPE) for a KV cache."""
        x = constrain(x, ROWS)
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, attend)
        x = constrain(x + self.input_layernorm_2(constrain(attn, ROWS)), ROWS)
        return constrain(x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x))),
                         ROWS), kv


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
