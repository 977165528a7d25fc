"""Hugging Face Ouro directories <-> ouro_jax models, streaming so that memory stays near one model copy.

A Hugging Face Ouro directory holds config.json (model_type "ouro", the released keys)
and the released state dict as safetensors: model.safetensors, or shards
model-0000i-of-0000n.safetensors listed in model.safetensors.index.json. `save_pretrained` adds
generation_config.json, optionally the tokenizer files, and the PyTorch modeling code
(configuration_ouro.py, modeling_ouro.py) that `trust_remote_code=True` loads.

Memory. Loading builds the model abstractly (`nnx.eval_shape`) and fills it one table rule at a time
(`hf.from_hf_tensors`): the per-layer tensors of a rule are read with `pread` (no memory map) straight
into one stacked NumPy array in the target dtype, which is moved to the device and dropped before the
next rule, so the peak is the model plus one stacked rule. Saving views each parameter on the host
(zero-copy on CPU) and streams one HF tensor at a time into the safetensors file; the weights are
never held twice.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from ouro_jax import run
from ouro_jax import tokenizer as tokenizer_lib
from ouro_jax.convert import hf
from ouro_jax.model.config import OuroConfig, dtype_name
from ouro_jax.model.ouro import Ouro

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MODEL_TYPE = "ouro"
HUB_REPO = "ByteDance/Ouro-1.4B"
"""Default repository of the official remote code that `auto_map="hub"` points at."""
AUTO_MAP = {  # the released auto_map entries
    "AutoConfig": "configuration_ouro.OuroConfig",
    "AutoModel": "modeling_ouro.OuroModel",
    "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
}
CODE_FILES = ("configuration_ouro.py", "modeling_ouro.py")
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_READABLE_DTYPES = ("F64", "F32", "F16", "BF16")
_TRANSFORMERS_PIN = "5.23.0"  # the [torch] extra's version, written when transformers is absent


class CheckpointError(run.RunError):
    """The input is not a loadable Ouro checkpoint; the message gives every reason at once."""


# --- loading ------------------------------------------------------------------------------------------
def from_pretrained(path: str | os.PathLike, dtype: Any = "float32", **runtime) -> Ouro:
    """An `Ouro` with the weights of a Hugging Face Ouro directory or an ouro_jax run.

    Args:
      path: a Hugging Face Ouro directory (config.json + safetensors), or an ouro_jax run directory
        (its latest checkpoint), its `checkpoints/` directory or one step `RUN/checkpoints/<step>`
        (`ouro_jax.run.locate`).
      dtype: compute and parameter dtype of the model, a name ("bfloat16") or a dtype (`jnp.bfloat16`);
        stored tensors (bf16 in the released checkpoints) are converted to it.
      **runtime: other OuroConfig runtime fields (param_dtype, remat_policy, attention_impl,
        scan_layers).

    Raises:
      FileNotFoundError: `path` is not a directory, or a run has no complete checkpoint.
      CheckpointError / run.RunError: not an Ouro checkpoint (e.g. model_type is not "ouro"), or its
        tensors do not match config.json (every missing, unexpected and mis-shaped tensor is listed).
    """
    runtime = {"dtype": dtype_name(dtype), "param_dtype": dtype_name(dtype), **runtime}
    try:
        location = run.locate(path)
    except run.RunError as err:
        raise CheckpointError(str(err)) from None
    if location.kind == "hf":
        return _from_hf(location.root, run.read_json(location.root / "config.json", CheckpointError), runtime)
    config = run.model_config(location.root, **runtime)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0))))
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever mesh saved the run
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                          nnx.to_pure_dict(state))
    try:
        params = run.restore_params(path, target)
    except (ValueError, KeyError) as err:
        if isinstance(err, run.RunError):
            raise CheckpointError(str(err)) from None
        raise CheckpointError(f"{path}: the checkpoint does not fit its config.json: {err}") from None
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _config(source: str, build) -> OuroConfig:
    try:
        return build()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None


def _from_hf(directory: Path, config_dict: dict, runtime: dict) -> Ouro:
    config = _hf_config(directory, config_dict, runtime)
    with contextlib.ExitStack() as stack:
        return _build(config, _hf_arrays(directory, config, stack))


def _hf_config(directory: Path, config_dict: dict, runtime: dict) -> OuroConfig:
    model_type = config_dict.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"{directory / 'config.json'}: model_type is {model_type!r}, not "
                              f"{MODEL_TYPE!r}; only Ouro checkpoints can be loaded")
    return _config(f"{directory / 'config.json'}", lambda: OuroConfig.from_hf_dict(config_dict, **runtime))


def _hf_arrays(directory: Path, config: OuroConfig,
               stack: contextlib.ExitStack) -> Iterator[tuple[hf.Path, np.ndarray]]:
    """(ouro_jax path, array in config.param_dtype) one table rule at a time, after checking every
    safetensors tensor against `config` (all problems in one CheckpointError)."""
    handles = _open_safetensors(directory, stack)
    shapes, dtypes = {}, {}
    for name, handle in handles.items():
        view = handle.get_slice(name)
        shapes[name], dtypes[name] = tuple(view.get_shape()), view.get_dtype()
    problems = hf.tensor_problems(config, shapes)
    bad = sorted(f"{name} ({dt})" for name, dt in dtypes.items() if dt not in _READABLE_DTYPES)
    if bad:
        problems.append(f"{len(bad)} not floating point {_READABLE_DTYPES}: " + ", ".join(bad[:8]))
    if problems:
        raise CheckpointError(f"{directory}: the safetensors weights do not match config.json: "
                              + "; ".join(problems))
    return hf.from_hf_tensors(config, lambda name: handles[name].get_tensor(name), config.param_jnp_dtype)


FUNCTION_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rope_theta",
                   "rope_scaling", "rms_norm_eps", "use_sliding_window", "sliding_window",
                   "max_window_layers", "tie_word_embeddings")
"""OuroConfig fields that define the function the weights compute (not the loop count, context length,
token ids or runtime settings, which a fine-tune may choose)."""


def check_source(path: str | os.PathLike, model: OuroConfig) -> run.Location:
    """Where `path` (a run, one of its steps or a Hugging Face Ouro directory) is, after checking that
    its architecture is `model`'s (FUNCTION_FIELDS) and, for a run, that it holds a checkpoint.

    Raises FileNotFoundError / run.RunError (CheckpointError) with every differing field in one line.
    """
    location = run.locate(path)
    if location.kind == "hf":
        source = _hf_config(location.root, run.read_json(location.root / "config.json", CheckpointError), {})
    else:
        run.checkpoint_step_dir(path)  # raises when the run has no complete checkpoint
        source = run.model_config(location.root)
    _check_architecture(path, source, model)
    return location


def _check_architecture(path: str | os.PathLike, source: OuroConfig, model: OuroConfig) -> None:
    differ = [f"{name}={getattr(source, name)!r} (config.model: {getattr(model, name)!r})"
              for name in FUNCTION_FIELDS if getattr(source, name) != getattr(model, name)]
    if differ:
        raise CheckpointError(f"{path}: another architecture than config.model: " + ", ".join(differ))


def hf_params(path: str | os.PathLike, model: OuroConfig, abstract_params) -> dict:
    """The parameters of the Hugging Face Ouro directory `path` as a pure dict in `abstract_params`'
    shapes, dtypes and shardings (training's `init_from`: each tensor goes straight to its shards).

    Raises CheckpointError when `path` is not an Ouro directory, its tensors do not match its
    config.json, or its architecture differs from `model` (FUNCTION_FIELDS).
    """
    directory = Path(path).absolute()
    config = _hf_config(directory, run.read_json(directory / "config.json", CheckpointError),
                        {"dtype": model.dtype, "param_dtype": model.param_dtype})
    _check_architecture(path, config, model)
    with contextlib.ExitStack() as stack:
        return _fill(jax.tree.map(lambda x: x, abstract_params), _hf_arrays(directory, config, stack))


def _open_safetensors(directory: Path, stack: contextlib.ExitStack) -> dict[str, safe_open]:
    """HF tensor name -> open safetensors file holding it (pread backend: nothing is memory-mapped)."""
    index_file = directory / INDEX_NAME
    if index_file.is_file():
        weight_map = run.read_json(index_file, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: no `weight_map`")
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} (weights are read from "
                              "safetensors only)")
    handles = {}
    for file in files:
        try:
            handle = stack.enter_context(safe_open(directory / file, framework="numpy", backend="pread"))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{directory / file}: not a readable safetensors file ({err})") from None
        handles.update(dict.fromkeys(handle.keys(), handle))
    return handles


def _fill(params: dict, arrays: Iterable[tuple[hf.Path, np.ndarray]]) -> dict:
    """Replace the abstract leaves (ShapeDtypeStructs) of the pure dict `params` with `arrays` (ouro_jax
    path, host array), each put on its leaf's sharding (the default device when it has none) before the
    next is read, so the host holds one array at a time."""
    for path, array in arrays:
        parent = params
        for key in path[:-1]:
            parent = parent[key]
        expected = parent[path[-1]]
        if (array.shape, array.dtype) != (expected.shape, expected.dtype):
            raise AssertionError(f"hf.rules disagrees with Ouro at {path}: {array.shape} {array.dtype}, "
                                 f"model {expected.shape} {expected.dtype}")
        parent[path[-1]] = jax.device_put(array, getattr(expected, "sharding", None)).block_until_ready()
        del array  # the host copy goes before the next rule is read
    return params


def _build(config: OuroConfig, arrays: Iterable[tuple[hf.Path, np.ndarray]]) -> Ouro:
    """An `Ouro` for `config` whose parameters come from `arrays` (ouro_jax path, array), one at a time."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0))))
    params = _fill(nnx.to_pure_dict(state), arrays)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# --- saving -------------------------------------------------------------------------------------------
def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, *, kind: str = "export",
                     source: str | os.PathLike | None = None) -> Path:
    """`out_dir` as an absolute path, if a `kind` ("export" or "import") may be written there.

    Never destroys what it did not write: `overwrite` replaces only an earlier output of the same kind
    that holds no run, and no output may be, contain or lie inside `source` or a training run.

    Raises:
      FileExistsError: `out_dir` is a file, or a non-empty directory and `overwrite` is False.
      ValueError: `out_dir` is, contains or lies inside `source` or a run, or is not an earlier `kind`.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if source is not None:
        src = Path(source).absolute()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"{out}: the output directory must not be, contain or lie inside the source "
                             f"{src}")
    for parent in out.parents:
        if _is_run(parent):
            raise ValueError(f"{out} lies inside the training run {parent}; write outside it")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to "
                                  "replace it)")
        if not _earlier_output(out, kind):
            raise ValueError(f"--overwrite refuses {out}: it is not an earlier {kind} of ouro_jax (only "
                             "such a directory is replaced; choose another output directory)")
    return out


def _config_json(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_run(directory: Path) -> bool:
    """A training run: a run config.json, a metrics.jsonl or a lock."""
    config = _config_json(directory)
    trained = config is not None and isinstance(config.get("model"), dict) and "imported_from" not in config
    return trained or (directory / run.METRICS).exists() or (directory / run.LOCK).exists()


def _earlier_output(directory: Path, kind: str) -> bool:
    """Whether `directory` looks like what an earlier export / import wrote, holding no run anywhere."""
    config = _config_json(directory)
    if config is None or any(_is_run(Path(root)) for root, _, _ in os.walk(directory)):
        return False
    if kind == "export":
        return config.get("model_type") == MODEL_TYPE and "model" not in config
    return isinstance(config.get("model"), dict) and "imported_from" in config


def _new_sibling(out: Path, tag: str) -> Path:
    """A new empty directory `.NAME.TAG-XXXXXXXX` next to `out` (created with the usual umask)."""
    while True:
        path = out.with_name(f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike, overwrite: bool = False, *, kind: str = "export",
                     source: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out_dir` that becomes `out_dir` when the block
    succeeds (replacing it when `overwrite`, see `check_output_dir`), and is removed when it fails."""
    out = check_output_dir(out_dir, overwrite, kind=kind, source=source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(out, "tmp")
    try:
        yield staging
        if out.is_dir() and any(out.iterdir()):
            old = _new_sibling(out, "old")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)  # also replaces an empty directory
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parse_size(size: int | str) -> int:
    """Bytes of "5GB" (10^9), "500MiB" (2^20), "10KB", … or of an int."""
    if isinstance(size, int):
        return size
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[:-len(unit)].strip().isdigit():
            return int(text[:-len(unit)]) * factor
    raise ValueError(f"max_shard_size={size!r}: expected an integer and a unit, e.g. '5GB' or '500MiB'")


def save_pretrained(
    model: Ouro,
    out_dir: str | os.PathLike,
    dtype: Any = "bfloat16",
    tokenizer: Tokenizer | str | None = None,
    max_shard_size: int | str = "5GB",
    auto_map: str = "local",
    overwrite: bool = False,
    hub_repo: str = HUB_REPO,
) -> Path:
    """Write `model` as a Hugging Face Ouro directory; returns its absolute path.

    Args:
      model: the model to export.
      out_dir: the directory to create. Everything is written into a temporary directory next to it
        and renamed at the end, so a failure never leaves a partial export.
      dtype: the weights' dtype in the files ("bfloat16" as released, "float32" or "float16"; a name or
        a dtype such as `jnp.bfloat16`).
      tokenizer: a `tokenizers.Tokenizer`, "ouro" (the bundled one) or a tokenizer path; its
        tokenizer.json, tokenizer_config.json and special_tokens_map.json are added. None: no tokenizer.
      max_shard_size: above this size the weights are split into model-0000i-of-0000n.safetensors
        files with a model.safetensors.index.json ("5GB" = 5*10^9 bytes, "5GiB" = 5*2^30).
      auto_map: "local" copies configuration_ouro.py and modeling_ouro.py (this package's code, which
        runs on transformers 5) into the directory and points auto_map at them; "hub" points auto_map at
        the official remote code in `hub_repo` ("ByteDance/Ouro-1.4B--modeling_ouro.OuroForCausalLM")
        and copies nothing (that code needs transformers < 4.56).
      overwrite: replace an existing non-empty `out_dir`.
      hub_repo: the repository `auto_map="hub"` refers to.

    Raises:
      FileExistsError: `out_dir` exists and is not empty, and `overwrite` is False.
      ValueError: an unknown dtype / auto_map / shard size, or a tokenizer larger than the vocabulary.
    """
    config = model.config
    dtype = dtype_name(dtype)
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {tuple(_SAFETENSORS_DTYPES)}")
    if auto_map not in ("local", "hub"):
        raise ValueError(f"auto_map={auto_map!r} must be 'local' or 'hub'")
    max_bytes = parse_size(max_shard_size)
    check_output_dir(out_dir, overwrite)
    if isinstance(tokenizer, str):
        tokenizer = tokenizer_lib.load(tokenizer)
    if tokenizer is not None and tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                         f"vocab_size {config.vocab_size}; pass a matching tokenizer or none")
    prefix = "" if auto_map == "local" else f"{hub_repo}--"
    entries = {auto_class: prefix + reference for auto_class, reference in AUTO_MAP.items()}
    with staged_directory(out_dir, overwrite) as staging:
        _write_json(staging / "config.json", hf_config(config, dtype, entries))
        _write_json(staging / "generation_config.json", generation_config(config, tokenizer))
        _write_weights(config, nnx.to_pure_dict(nnx.state(model, nnx.Param)), staging, dtype, max_bytes)
        if tokenizer is not None:
            tokenizer_lib.save_hf_files(tokenizer, staging)
        if auto_map == "local":
            for name in CODE_FILES:
                shutil.copyfile(Path(__file__).with_name(name), staging / name)
    return Path(out_dir).absolute()


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return _TRANSFORMERS_PIN


def hf_config(config: OuroConfig, dtype: str, auto_map: dict[str, str]) -> dict:
    """config.json: every key of the released config, weights stored as `dtype`.

    Both `torch_dtype` (transformers 4) and `dtype` (transformers 5) are written.
    """
    return {
        "architectures": ["OuroForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": auto_map,
        **config.to_hf_dict(),
        "torch_dtype": dtype,
        "dtype": dtype,
        "transformers_version": _transformers_version(),
    }


def generation_config(config: OuroConfig, tokenizer: Tokenizer | None = None) -> dict:
    """generation_config.json: stop at the end of a chat turn `<|im_end|>` and at `<|endoftext|>`.

    The stop ids are those tokens' ids in the exported `tokenizer`; without one, the Ouro tokenizer's (2, 0)
    for a model with its vocabulary, and none for any other model (a task model whose ids are ordinary
    symbols then generates until max_new_tokens). config.json keeps the released bos = eos = pad = 0.
    """
    if tokenizer is not None:
        stop = [tokenizer.token_to_id(t) for t in (tokenizer_lib.IM_END, tokenizer_lib.ENDOFTEXT)]
    elif config.vocab_size == tokenizer_lib.VOCAB_SIZE:
        stop = list(tokenizer_lib.STOP_IDS)
    else:
        stop = []
    eos = [i for i in dict.fromkeys(stop) if i is not None and i < config.vocab_size]
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos or None,
            "pad_token_id": config.pad_token_id, "transformers_version": _transformers_version()}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(config: OuroConfig, params: dict, directory: Path, dtype: str, max_bytes: int) -> None:
    """Stream the state dict into safetensors file(s) under `directory` (+ the index when sharded)."""
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    shapes = hf.hf_shapes(config)
    sizes = {name: math.prod(shape) * np_dtype.itemsize for name, shape in shapes.items()}
    shards, current = [], []
    for name in shapes:  # consecutive runs of names, each at most max_bytes unless one tensor is larger
        if current and sum(sizes[n] for n in current) + sizes[name] > max_bytes:
            shards.append(current)
            current = []
        current.append(name)
    shards.append(current)
    files = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    tensors = hf.to_hf_tensors(config, params)
    for file, names in zip(files, shards, strict=True):
        write_safetensors(directory / file, {n: shapes[n] for n in names}, np_dtype, tensors)
    if len(shards) > 1:
        _write_json(directory / INDEX_NAME, {
            "metadata": {"total_size": sum(sizes.values()),
                         "total_parameters": sum(math.prod(s) for s in shapes.values())},
            "weight_map": {name: file for file, names in zip(files, shards, strict=True) for name in names}})


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: np.dtype,
                      tensors: Iterator[tuple[str, np.ndarray]]) -> None:
    """Write a safetensors file whose tensors, named and shaped by `shapes`, are the next
    `len(shapes)` items of `tensors`, cast to `dtype` and written one at a time.

    Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
    plus "__metadata__": {"format": "pt"} padded with spaces to 8 bytes, then the raw tensor bytes.
    """
    code = _SAFETENSORS_DTYPES[dtype.name]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            got, array = next(tensors)
            if got != name or array.shape != shape:
                raise AssertionError(f"tensor stream out of order: got {got} {array.shape}, "
                                     f"expected {name} {shape}")
            f.write(np.ascontiguousarray(array, dtype).view(np.uint8).data)
