"""The KV cache of a looped model, with decode-time KV sharing (ouro_spec.md §5, paper Table 14).

Shapes: T loop steps that may run (config.total_ut_steps, or k+1 with `exit_at_step=k`), N layers,
B batch, P prompt length (left-padded), M = max_new_tokens, K kv heads, H head_dim.

Layout: one array per cache slot, slot index t * N + l for loop step t and layer l (the released
code's `cache_idx`), so that a step reads and writes its slots with no slicing copies.
  prompt_k, prompt_v  T*N arrays [B, K, P, H]: one slot per (loop step, layer) for every prompt token;
                      the paper keeps all T caches for the prompt (sharing them in prefill costs >10 points).
  decode_k, decode_v  the decoded tokens. sharing "none": T*N arrays [B, K, M, H], one slot per
                      (step, layer) as in the released code (exact). sharing "last" / "average": N arrays
                      [B, K, M, H], ONE slot per layer that every loop step reads, so decoded-token memory
                      is 1/T of "none".
Decoded token j (the j-th token fed back, j = 0..M-2) lives at position j; position M-1 is never written
(the last generated token is not fed back).

Which K/V a query reads, for the token being decoded at loop step t, layer l:
  * prompt tokens: their own step-t K/V, slot (t, l);
  * earlier decoded tokens: slot (t, l) ("none") or their single shared entry of layer l;
  * itself: the K/V it computes at step t during this forward (never a shared entry: the shared entry
    of a token is written only after its whole loop has run).
Shared entry of a token ("last"): its K/V at the last step it executed; ("average"): the mean of its
K/V over the steps it executed (steps 0..e for a token that exited at step e).

Skipped steps: a token that exits at step e < T-1 never computes steps e+1..T-1; with sharing "none"
their slots get a copy of its step-e K/V (`fill_skipped`), so later tokens that run those steps
attend to the token's last computed state (the Huginn "latest" policy; ouro_spec.md §5 leaves it open).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

SHARING = ("none", "last", "average")


def take_step(x: jax.Array, step: jax.Array, batch_axis: int) -> jax.Array:
    """Per-row gather along the leading step axis. x [T, ...] with rows on `batch_axis`, step [B] int
    -> x without its step axis."""
    shape = [1] * x.ndim
    shape[batch_axis] = step.shape[0]
    index = jnp.broadcast_to(step.reshape(shape), (1, *x.shape[1:]))
    return jnp.take_along_axis(x, index, axis=0)[0]


def fill_skipped(x: jax.Array, exit_step: jax.Array, batch_axis: int) -> jax.Array:
    """Copy each row's exit-step entry into the steps it skipped.

    x [T, ...] one token's per-step values (entries after a row's exit step are don't-care), rows on
    `batch_axis`; exit_step [B] int, the last step each row executed -> x with steps > exit_step filled.
    """
    shape = [1] * x.ndim
    shape[batch_axis] = exit_step.shape[0]
    steps = jnp.arange(x.shape[0]).reshape(-1, *[1] * (x.ndim - 1))
    executed = steps <= exit_step.reshape(shape)
    return jnp.where(executed, x, take_step(x, exit_step, batch_axis)[None])


def share(kv: jax.Array, exit_step: jax.Array, sharing: str) -> jax.Array:
    """The single decode-time entry per layer of one token.

    kv [T, N, B, K, H]; exit_step [B] -> [N, B, K, H]: step `exit_step`'s K/V ("last") or the mean over
    steps 0..exit_step ("average", accumulated in float32).
    """
    if sharing == "last":
        return take_step(kv, exit_step, batch_axis=2)
    executed = jnp.arange(kv.shape[0])[:, None, None, None, None] <= exit_step[None, None, :, None, None]
    total = jnp.sum(jnp.where(executed, kv.astype(jnp.float32), 0.0), axis=0)
    return (total / (exit_step + 1).astype(jnp.float32)[None, :, None, None]).astype(kv.dtype)


@struct.dataclass
class KVCache:
    """Prompt and decoded-token K/V (layout in the module docstring)."""

    prompt_k: tuple[jax.Array, ...]
    prompt_v: tuple[jax.Array, ...]
    decode_k: tuple[jax.Array, ...]
    decode_v: tuple[jax.Array, ...]
    num_layers: int = struct.field(pytree_node=False)
    sharing: str = struct.field(pytree_node=False)

    @classmethod
    def create(cls, prompt_k, prompt_v, max_new_tokens: int, sharing: str) -> KVCache:
        """Wrap the prefill's K/V (nested [t][l] lists of [B, K, P, H]) and allocate zeroed decode slots
        for M tokens."""
        if sharing not in SHARING:
            raise ValueError(f"kv_sharing={sharing!r} must be one of {SHARING}")
        flat = lambda nested: tuple(x for per_step in nested for x in per_step)
        b, k, _, h = prompt_k[0][0].shape
        slots = len(prompt_k) * len(prompt_k[0]) if sharing == "none" else len(prompt_k[0])
        dtype = prompt_k[0][0].dtype
        zeros = lambda: tuple(jnp.zeros((b, k, max_new_tokens, h), dtype) for _ in range(slots))
        return cls(flat(prompt_k), flat(prompt_v), zeros(), zeros(), len(prompt_k[0]), sharing)

    def prompt(self, step: int, layer: int) -> tuple[jax.Array, jax.Array]:
        """Prompt K/V read at (step, layer): two [B, K, P, H] arrays."""
        slot = step * self.num_layers + layer
        return self.prompt_k[slot], self.prompt_v[slot]

    def decoded(self, step: int, layer: int) -> tuple[jax.Array, jax.Array]:
        """Decoded-token K/V read at (step, layer): two [B, K, M, H] arrays."""
        slot = step * self.num_layers + layer if self.sharing == "none" else layer
        return self.decode_k[slot], self.decode_v[slot]

    def write(self, position: jax.Array, k: jax.Array, v: jax.Array, exit_step: jax.Array) -> KVCache:
        """Store one decoded token at `position`. k, v [T, N, B, K, H] as computed (skipped steps are
        don't-care); exit_step [B] the last step each row executed."""
        if self.sharing == "none":
            k, v = fill_skipped(k, exit_step, 2), fill_skipped(v, exit_step, 2)
            k, v = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])  # [T*N, B, K, H]
        else:
            k, v = share(k, exit_step, self.sharing), share(v, exit_step, self.sharing)  # [N, B, K, H]
        update = lambda slots, new: tuple(
            jax.lax.dynamic_update_slice(slot, x[:, :, None], (0, 0, position, 0))
            for slot, x in zip(slots, new, strict=True))
        return self.replace(decode_k=update(self.decode_k, k), decode_v=update(self.decode_v, v))

    def nbytes(self) -> dict[str, int]:
        """Bytes held: {"prompt", "decoded", "total"}."""
        size = lambda slots: sum(x.nbytes for x in slots)
        prompt = size(self.prompt_k) + size(self.prompt_v)
        decoded = size(self.decode_k) + size(self.decode_v)
        return {"prompt": prompt, "decoded": decoded, "total": prompt + decoded}
