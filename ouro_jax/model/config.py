"""`OuroConfig`: the model hyper-parameters, named exactly as the released `config.json` keys.

The fields above the `# ouro_jax runtime` marker mirror the Hugging Face `config.json` of the released
Ouro checkpoints; the fields below it choose how ouro_jax runs the model (compute and parameter dtypes,
activation checkpointing, attention kernel) and never reach an exported `config.json`. The dtype fields
hold names ("bfloat16"); a JAX/NumPy dtype (`jnp.bfloat16`) given for them is stored as its name, and
`compute_jnp_dtype` / `param_jnp_dtype` give the dtype objects.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")
# Activation-checkpointing policies applied to each decoder layer (see `layers.remat_policy`).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv", "save_qkv_context")
# "splash": the TPU Pallas kernel for training and evaluation (no S x S scores; see layers.splash_attention)
ATTENTION_IMPLS = ("xla", "cudnn", "auto", "splash")

# OuroConfig fields that choose how ouro_jax runs a model, not what the model is: `to_hf_dict` leaves them
# out of an exported config.json and `from_hf_dict` never reads them from one (they come as arguments).
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "scan_layers")


@dataclasses.dataclass(frozen=True)
class OuroConfig:
    """Ouro architecture. Defaults are the released Ouro-1.4B values (arXiv:2510.25741 Table 2)."""

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    total_ut_steps: int = 4
    early_exit_threshold: float = 1.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0
    use_cache: bool = True
    # ouro_jax runtime --------------------------------------------------------------------------
    dtype: str = "float32"  # name of the compute dtype of activations and matmuls
    param_dtype: str = "float32"  # name of the storage dtype of the parameters (master weights)
    remat_policy: str = "none"  # activation checkpointing per decoder layer, one of REMAT_POLICIES
    attention_impl: str = "xla"  # jax.nn.dot_product_attention implementation; "auto" lets JAX pick
    # True: the N layers run as a `lax.scan` (compile time independent of N); False: unrolled,
    # which compiles in time ~N but runs faster where scan bookkeeping dominates (small models, CPU).
    scan_layers: bool = True

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name)))
        problems = list(_problems(self))
        if problems:
            raise ValueError("invalid OuroConfig: " + "; ".join(problems))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    # --- derived -------------------------------------------------------------------------------
    @property
    def compute_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def param_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> OuroConfig:
        """A validated copy with `changes` applied (a resolved `head_dim` is kept unless changed)."""
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json ----------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The architecture keys of a released `config.json` (no runtime fields)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in RUNTIME_FIELDS:
            d.pop(name)
        d["layer_types"] = ["full_attention"] * self.num_hidden_layers
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime: Any) -> OuroConfig:
        """Build from a `config.json` dict; keys that are not architecture fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS)
        layer_types = d.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise ValueError(f"config.json layer_types: only full_attention is supported, got {layer_types}")
        return cls(**{k: v for k, v in d.items() if k in names}, **runtime)


def dtype_name(dtype: Any) -> Any:
    """"bfloat16", jnp.bfloat16, np.dtype("bfloat16") -> "bfloat16"; anything else is returned as is
    (and reported by validation)."""
    if isinstance(dtype, str):
        return dtype
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return dtype


def _problems(c: OuroConfig):
    """Yield one 'field: why' message per invalid field."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            yield f"{name}={getattr(c, name)!r} must be a positive integer"
    if c.total_ut_steps is None or not isinstance(c.total_ut_steps, int) or c.total_ut_steps < 1:
        yield f"total_ut_steps={c.total_ut_steps!r} must be an integer >= 1 (T, the number of loops)"
    if c.num_attention_heads > 0 and c.hidden_size % c.num_attention_heads and c.head_dim is None:
        yield (f"num_attention_heads={c.num_attention_heads} must divide hidden_size={c.hidden_size} "
               "when head_dim is not given")
    if c.num_attention_heads > 0 and c.num_key_value_heads > 0 and (
            c.num_attention_heads % c.num_key_value_heads):
        yield (f"num_key_value_heads={c.num_key_value_heads} must divide "
               f"num_attention_heads={c.num_attention_heads} (grouped-query attention)")
    head_dim = c.head_dim
    if head_dim is None and c.num_attention_heads > 0:
        head_dim = c.hidden_size // c.num_attention_heads
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2):
        yield f"head_dim={head_dim!r} must be a positive even integer (half-split RoPE)"
    if c.hidden_act != "silu":
        yield f"hidden_act={c.hidden_act!r}: Ouro uses a SwiGLU MLP, only 'silu' is supported"
    if not c.rope_theta > 0:
        yield f"rope_theta={c.rope_theta!r} must be > 0"
    if c.rope_scaling is not None:
        yield f"rope_scaling={c.rope_scaling!r}: only the default RoPE (null) is supported"
    if not c.rms_norm_eps > 0:
        yield f"rms_norm_eps={c.rms_norm_eps!r} must be > 0"
    if not c.initializer_range > 0:
        yield f"initializer_range={c.initializer_range!r} must be > 0"
    if c.attention_dropout != 0.0:
        yield f"attention_dropout={c.attention_dropout!r}: Ouro has no dropout, must be 0.0"
    if c.use_sliding_window:
        yield "use_sliding_window=True: Ouro uses full attention in every layer"
    if not 0.0 <= c.early_exit_threshold <= 1.0:
        yield f"early_exit_threshold={c.early_exit_threshold!r} must lie in [0, 1]"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(c, name)
        if value is not None and not 0 <= value < max(c.vocab_size, 1):
            yield f"{name}={value!r} must be a token id in [0, vocab_size={c.vocab_size})"
    for name in ("dtype", "param_dtype"):
        if getattr(c, name) not in DTYPES:
            yield f"{name}={getattr(c, name)!r} must be one of {DTYPES}"
    if c.remat_policy not in REMAT_POLICIES:
        yield f"remat_policy={c.remat_policy!r} must be one of {REMAT_POLICIES}"
    if c.attention_impl not in ATTENTION_IMPLS:
        yield f"attention_impl={c.attention_impl!r} must be one of {ATTENTION_IMPLS}"


# --- presets --------------------------------------------------------------------------------------
def ouro_1p4b(**overrides: Any) -> OuroConfig:
    """ByteDance/Ouro-1.4B (and -Thinking): 24 layers x 4 loops, hidden 2048, vocab 49152."""
    return OuroConfig(**overrides)


def ouro_2p6b(**overrides: Any) -> OuroConfig:
    """ByteDance/Ouro-2.6B (and -Thinking): as 1.4B with 48 layers (upcycled by duplication)."""
    return OuroConfig(**{"num_hidden_layers": 48, **overrides})


def tiny(**overrides: Any) -> OuroConfig:
    """A few-thousand-parameter Ouro for tests and demos (GQA, 2 layers, 4 loops)."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10_000.0,
                max_position_embeddings=512, total_ut_steps=4)
    return OuroConfig(**{**base, **overrides})


def cpu_benchmark(**overrides: Any) -> OuroConfig:
    """The CPU benchmark shape (docs/benchmarks.md): hidden 256, 4 layers, 4 MHA heads of 64, vocab 4096,
    T=4."""
    base = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, head_dim=64, rope_theta=10_000.0,
                max_position_embeddings=4096, total_ut_steps=4)
    return OuroConfig(**{**base, **overrides})


PRESETS = {"ouro_1p4b": ouro_1p4b, "ouro_2p6b": ouro_2p6b, "tiny": tiny,
           "cpu_benchmark": cpu_benchmark}
