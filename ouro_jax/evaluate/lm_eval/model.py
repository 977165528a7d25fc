"""The lm-evaluation-harness model "ouro_jax": an Ouro checkpoint scored and decoded with JAX.

    import ouro_jax.evaluate.lm_eval          # registers "ouro_jax"
    lm_eval.simple_evaluate(model="ouro_jax", model_args="pretrained=PATH,exit_threshold=0.9", tasks=[...])

Model args (`model_args`):
  pretrained      a run, one of its steps, or a Hugging Face Ouro directory (`ouro_jax.from_pretrained`).
  dtype           "float32" (default) or "bfloat16".
  batch_size      rows per forward / generation batch (default 8; "auto" means the default).
  max_length      context limit in tokens (default: the model's max_position_embeddings).
  num_loops       loops to run (default: the trained T; more extrapolates).
  exit_at_loop    k in 1..num_loops: every token runs loops 1..k and is scored / decoded from loop k.
  exit_threshold  Q-exit q in [0, 1] (arXiv:2510.25741 §3.2): each token uses the first loop whose exit
                  CDF reaches q. Scoring computes every loop and picks each token's loop; generation
                  (`ouro_jax.generate`) stops running loops once a token has exited.
  kv_sharing      decode-time KV sharing of generation: "none", "last" or "average" (§5.4.2).
  tokenizer       "ouro" or a tokenizer.json path (default: PATH/tokenizer.json when present, else "ouro").
  prefix_token_id the token that conditions an empty context and the first rolling window (default: the
                  one lm-eval's `hf` model uses for the same directory, so scores match published `hf`
                  results: the `bos_token` of PATH/tokenizer_config.json when set, else its `eos_token`;
                  <|endoftext|>, the document separator of pre-training, without a tokenizer_config.json).
  max_gen_toks    default generation length when a task does not set one (256).

`OuroLM.mean_loops` is the mean number of loops the scored targets / generated tokens ran since
`reset_depth()` (Q-exit's compute).

Requests are grouped into a few fixed shapes, so a task compiles a handful of times, not once per request:
rows are right-padded (scoring) or left-padded (generation) to the next length of `BUCKETS` (capped at
max_length) and batches are filled up to `batch_size` with empty rows.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import models as _builtin_models  # noqa: F401 - see below
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ouro_jax import tokenizer as tok
from ouro_jax.convert.pretrained import from_pretrained
from ouro_jax.inference import generate, left_pad
from ouro_jax.model import exits
from ouro_jax.model.ouro import Ouro

BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEFAULT_BATCH_SIZE = 8
Row = tuple[list[int], list[int]]  # (input tokens, target tokens of the last len(targets) positions)


def with_num_loops(model: Ouro, num_loops: int) -> Ouro:
    """The same parameters with `total_ut_steps = num_loops` (the parameters do not depend on T)."""
    if num_loops == model.config.total_ut_steps:
        return model
    config = model.config.replace(total_ut_steps=num_loops)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def bucket(length: int, limit: int) -> int:
    """The padded length of a row of `length` tokens: the first bucket >= length, at most `limit`."""
    return min(next((b for b in BUCKETS if b >= length), limit), limit)


def token_scores(model: Ouro, input_ids: jax.Array, targets: jax.Array, num_loops: int):
    """Every loop's target log-probs and greedy hits, [L, B, S] float32 / bool, and the gate logits
    [L, B, S]; one loop's logits exist at a time."""

    def readout(hidden):
        logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
        target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return target_logp, jnp.argmax(logp, axis=-1) == targets

    (logp, greedy), gate_logits = model.loop(input_ids, readout, num_loops=num_loops)
    return logp, greedy, gate_logits


def row_scores(logp: jax.Array, greedy: jax.Array, loop: jax.Array | int, weights: jax.Array):
    """Per-loop token scores [L, B, S] read at `loop` (0-based; an int or [B, S]) -> (sum of weighted
    target log-probs [B], every weighted target is the argmax [B], loops run by the weighted targets [B])."""
    logp, greedy = exits.select_loop(logp, loop), exits.select_loop(greedy, loop)
    depth = jnp.broadcast_to(jnp.asarray(loop) + 1, weights.shape).astype(jnp.float32)
    return (jnp.sum(logp * weights, axis=1), jnp.all(greedy | (weights == 0), axis=1),
            jnp.sum(depth * weights, axis=1))


def _score_fn(model: Ouro, num_loops: int, exit_threshold: float | None):
    """jit(params, input_ids [B, S], targets [B, S], weights [B, S]) -> `row_scores` from the last of
    `num_loops` loops or, with `exit_threshold`, each token's Q-exit loop."""
    graphdef = nnx.graphdef(model)

    def score(params, input_ids, targets, weights):
        logp, greedy, gate_logits = token_scores(nnx.merge(graphdef, params), input_ids, targets, num_loops)
        loop = num_loops - 1 if exit_threshold is None else exits.q_exit_loop(gate_logits, exit_threshold)
        return row_scores(logp, greedy, loop, weights)

    return jax.jit(score)


# lm-eval 0.4.13 fills its registry with the built-in models ("hf", ...) only when the registry is empty at
# the first lookup; importing `lm_eval.models` above, before registering, keeps them available.
@register_model("ouro_jax")
class OuroLM(TemplateLM):
    """lm-eval `TemplateLM` over an `ouro_jax.Ouro` (model args: see the module docstring)."""

    def __init__(self, pretrained: str, dtype: str = "float32", batch_size: int | str | None = None,
                 max_length: int | None = None, num_loops: int | None = None, exit_at_loop: int | None = None,
                 exit_threshold: float | None = None, kv_sharing: str = "none", tokenizer: str | None = None,
                 prefix_token_id: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                 max_batch_size: int | None = None):
        """`device` and `max_batch_size` are lm-eval's generic options; JAX places the model itself and
        the batch size is fixed, so both are ignored."""
        super().__init__()
        del device, max_batch_size
        model = from_pretrained(pretrained, dtype=dtype)
        self.trained_loops = model.config.total_ut_steps
        num_loops = int(num_loops or self.trained_loops)
        if exit_at_loop is not None and exit_threshold is not None:
            raise ValueError("exit_at_loop fixes the depth: do not combine it with exit_threshold")
        if exit_at_loop is not None and not 1 <= int(exit_at_loop) <= num_loops:
            raise ValueError(f"exit_at_loop={exit_at_loop} must lie in 1..{num_loops}")
        if exit_threshold is not None and not 0.0 <= float(exit_threshold) <= 1.0:
            raise ValueError(f"exit_threshold={exit_threshold} must lie in [0, 1]")
        self.model = with_num_loops(model, num_loops)
        self.exit_at_loop = None if exit_at_loop is None else int(exit_at_loop)
        self.exit_threshold = None if exit_threshold is None else float(exit_threshold)
        self.kv_sharing = kv_sharing
        source = tokenizer or (pretrained if _has_tokenizer_file(pretrained) else "ouro")
        self.tokenizer = tok.load(source)
        if self.tokenizer.get_vocab_size() > model.config.vocab_size:
            raise ValueError(f"tokenizer {source!r} has {self.tokenizer.get_vocab_size()} tokens, more than "
                             f"the model's vocab_size {model.config.vocab_size}")
        self.batch_size = (DEFAULT_BATCH_SIZE if batch_size in (None, "auto")
                           else int(str(batch_size).split(":")[0]))
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self._prefix = (default_prefix_token_id(pretrained, self.tokenizer) if prefix_token_id is None
                        else int(prefix_token_id))
        self.max_gen_toks = int(max_gen_toks)
        self._params = nnx.state(self.model)
        self._score = _score_fn(self.model, self.exit_at_loop or num_loops, self.exit_threshold)
        self.reset_depth()

    def reset_depth(self) -> None:
        """Start counting anew the loops run by scored targets and generated tokens (`mean_loops`)."""
        self.depth_total, self.depth_tokens = 0.0, 0

    @property
    def mean_loops(self) -> float:
        """Mean loops per scored target / generated token since `reset_depth` (nan before any)."""
        return self.depth_total / self.depth_tokens if self.depth_tokens else float("nan")

    # --- what TemplateLM needs --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return tok.ENDOFTEXT_ID

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "ouro"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Plain text -> ids; the Ouro tokenizer adds no special tokens (special-token text still maps
        to its id)."""
        del add_special_tokens, kwargs
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # --- scoring ---------------------------------------------------------------------------------
    def _row(self, context: list[int], continuation: list[int]) -> Row:
        """(context + continuation) cut to its last max_length + 1 tokens -> (inputs, continuation
        targets), as lm-eval's `hf` model does."""
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:-1], whole[-len(continuation):] if len(continuation) < len(whole) else whole[1:]

    def _batches(self, rows: Sequence[Row], disable_tqdm: bool):
        """Rows grouped by bucket length into fixed-shape batches: yields (row indices, input ids, targets,
        weights), each array [batch_size, length]; unused rows are all zero."""
        by_bucket = collections.defaultdict(list)
        for i, (inputs, _) in enumerate(rows):
            by_bucket[bucket(len(inputs), self.max_length)].append(i)
        batches = [(length, members[k:k + self.batch_size]) for length, members in sorted(by_bucket.items())
                   for k in range(0, len(members), self.batch_size)]
        for length, members in tqdm(batches, desc="ouro_jax scoring", disable=disable_tqdm):
            shape = (self.batch_size, length)
            ids, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            weights = np.zeros(shape, np.float32)
            for r, i in enumerate(members):
                inputs, target = rows[i]
                ids[r, :len(inputs)] = inputs
                targets[r, len(inputs) - len(target):len(inputs)] = target
                weights[r, len(inputs) - len(target):len(inputs)] = 1.0
            yield members, ids, targets, weights

    def _score_rows(self, rows: Sequence[Row], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """Sum of target log-probs and whether every target is the argmax, per row."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for members, *arrays in self._batches(rows, disable_tqdm):
            logp, greedy, depth = jax.device_get(self._score(self._params, *arrays))
            for r, i in enumerate(members):
                results[i] = (float(logp[r]), bool(greedy[r]))
                self.depth_total += float(depth[r])
                self.depth_tokens += len(rows[i][1])
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        del kwargs
        results = self._score_rows([self._row(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (args, _, _), result in zip(requests, results, strict=True):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of max_length tokens (each window sees the
        preceding context up to max_length), as plain floats."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(self._row(context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._score_rows(windows, disable_tqdm), strict=True):
            totals[owner] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # --- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations through `ouro_jax.generate` (sampled with `do_sample` and temperature /
        top_k / top_p), cut at the first stop string of `until` and before <|endoftext|> / <|im_end|>;
        requests with equal generation settings share batches. Other generation kwargs are ignored."""
        groups = collections.defaultdict(list)
        for index, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(index)
        outputs: list[str] = [""] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            texts = self._generate([requests[i].args[0] for i in members], kwargs, disable_tqdm)
            for i, text in zip(members, texts, strict=True):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def _generate(self, contexts: Sequence[str], kwargs: dict, disable_tqdm: bool) -> list[str]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
        sampling = dict(temperature=float(kwargs.get("temperature", 1.0)), top_k=kwargs.get("top_k"),
                        top_p=kwargs.get("top_p")) if sample else {}
        stop_ids = list(tok.STOP_IDS) + [ids[0] for ids in map(self.tok_encode, until) if len(ids) == 1]
        keep = max(self.max_length - max_new, 1)  # as lm-eval's `hf`: prompt + generation fit max_length
        prompts = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]
        by_bucket = collections.defaultdict(list)
        for i, prompt in enumerate(prompts):
            by_bucket[bucket(len(prompt), self.max_length)].append(i)
        texts = [""] * len(prompts)
        batches = [(width, members[k:k + self.batch_size]) for width, members in sorted(by_bucket.items())
                   for k in range(0, len(members), self.batch_size)]
        for width, members in tqdm(batches, desc="ouro_jax generation", disable=disable_tqdm):
            rows = [prompts[i] for i in members] + [[self.prefix_token_id]] * (self.batch_size - len(members))
            ids, lengths = left_pad(rows, pad_id=tok.ENDOFTEXT_ID)
            ids = np.pad(ids, ((0, 0), (width - ids.shape[1], 0)), constant_values=tok.ENDOFTEXT_ID)
            out = generate(self.model, ids, max_new, prompt_lengths=lengths, exit_at_loop=self.exit_at_loop,
                           exit_threshold=self.exit_threshold, kv_sharing=self.kv_sharing,
                           stop_tokens=stop_ids, pad_id=tok.ENDOFTEXT_ID, **sampling)
            for r, i in enumerate(members):
                tokens = [int(t) for t in out.tokens[r, :out.lengths[r]]]
                self.depth_total += float(np.sum(out.exit_loops[r, :out.lengths[r]]))
                self.depth_tokens += int(out.lengths[r])
                texts[i] = _cut(self.tok_decode(_until_stop(tokens, tok.STOP_IDS)), until)
        return texts


def default_prefix_token_id(path: str, tokenizer) -> int:
    """The prefix token lm-eval's `hf` model uses for the Hugging Face directory `path`: the tokenizer's
    bos_token when its tokenizer_config.json sets one, else its eos_token (the `hf` model's end-of-text
    token); <|endoftext|> when there is no tokenizer_config.json (a run directory)."""
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return tok.ENDOFTEXT_ID
    with open(config_path) as f:
        config = json.load(f)
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return tok.ENDOFTEXT_ID


def _has_tokenizer_file(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer.json"))


def _until_stop(tokens: Iterable[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens before the first end-of-text / end-of-turn token."""
    kept = []
    for t in tokens:
        if t in stop_ids:
            break
        kept.append(t)
    return kept


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
