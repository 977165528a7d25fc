"""The lm-evaluation-harness model "ouro_jax": scores against an independent full-forward computation,
fixed-shape batching, agreement with lm-eval's `hf` model on the exported PyTorch checkpoint (offline
local tasks: loglikelihood, rolling, multiple choice, generate_until with a stop string), CLI errors."""

import functools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from ouro_jax import tokenizer as tok
from ouro_jax.evaluate.lm_eval import OuroLM
from ouro_jax.evaluate.lm_eval import __main__ as lm_eval_cli

from util import exported_gated_model

MAX_LENGTH = 64
TEXT = ("A looped language model applies the same stack of layers several times, and an exit gate reads "
        "the state after every loop to decide whether the token may leave early. ") * 3
DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " London", " a city in Europe"],
     "answer": 0, "context": "Two plus two is", "continuation": "four", "text": TEXT},
    {"question": "Water boils at", "choices": [" 100 degrees", " cold"], "answer": 1,
     "context": "Hello", "continuation": "world, again", "text": "Short text."},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Ouro with the Ouro tokenizer's vocabulary, exported with the tokenizer and the PyTorch
    modeling code."""
    return exported_gated_model(tmp_path_factory.mktemp("lm_eval") / "hf", vocab_size=49152,
                                context=MAX_LENGTH, tokenizer="ouro")


@functools.partial(nnx.jit, static_argnames="num_loops")
def _forward(model, input_ids, num_loops):
    out = model(input_ids, num_loops=num_loops)
    return out.logits, out.gate_logits


def full_forward(model, ids, num_loops):
    """`model(...)` on one row (right-padded to MAX_LENGTH: causal, so the padding changes nothing):
    every loop's log-softmax [L, S, V] and gate logits [L, S], float64."""
    padded = np.zeros((1, MAX_LENGTH), np.int32)
    padded[0, :len(ids)] = ids
    logits, gate = _forward(model, jnp.asarray(padded), num_loops)
    logits = np.asarray(logits[:, 0, :len(ids)], np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logp, np.asarray(gate[:, 0, :len(ids)], np.float64)


def log_probs(model, ids, num_loops):
    """Every loop's log-softmax on one row: [L, S, V]."""
    return full_forward(model, ids, num_loops)[0]


def q_exit(model, ids, num_loops, q):
    """The Q-exit loop (0-based) of every position, in float64 from the gate logits."""
    gate = full_forward(model, ids, num_loops)[1]
    cdf = 1 - np.cumprod(1 - 1 / (1 + np.exp(-gate)), axis=0)
    reached = cdf[:-1] >= q
    return np.where(reached.any(0), reached.argmax(0), num_loops - 1)


@pytest.mark.slow
def test_scores_equal_an_independent_full_forward(hf_dir):
    from ouro_jax.convert.pretrained import from_pretrained

    model = from_pretrained(hf_dir)
    encode = lambda s: tok.load("ouro").encode(s, add_special_tokens=False).ids
    pairs = [("Two plus two is", " four"), ("The capital of France is", " Paris, of course"),
             ("word " * 39 + "word", " end of a longer context")]
    lm = OuroLM(pretrained=hf_dir, batch_size=2, num_loops=4, exit_threshold=0.6)  # one extrapolated loop
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logp, greedy) in zip(pairs, got, strict=True):
        ids, n_context = encode(context + continuation), len(encode(context))
        lp = log_probs(model, ids[:-1], 4)
        loops = q_exit(model, ids[:-1], 4, 0.6)
        positions = np.arange(n_context - 1, len(ids) - 1)
        chosen = lp[loops[positions], positions]
        assert logp == pytest.approx(chosen[np.arange(len(positions)), ids[n_context:]].sum(), abs=1e-4)
        assert greedy == bool(np.all(chosen.argmax(-1) == ids[n_context:]))
    # requests of up to 32 and of 33..64 tokens: two fixed shapes, two compilations
    assert lm._score._cache_size() == 2

    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0)])
    tokens = encode(TEXT)
    assert len(tokens) > MAX_LENGTH and type(rolling[0]) is float
    expected = 0.0
    for start in range(0, len(tokens), MAX_LENGTH):  # predict MAX_LENGTH tokens at a time, each window
        end = min(start + MAX_LENGTH, len(tokens))    # filled up with the preceding tokens
        # the export's tokenizer_config.json sets bos_token <|im_start|>: lm-eval's `hf` model's prefix
        inputs = [tok.IM_START_ID, *tokens[:end - 1]] if start == 0 else tokens[end - MAX_LENGTH - 1:end - 1]
        lp, loops = log_probs(model, inputs, 4), q_exit(model, inputs, 4, 0.6)
        scored = np.arange(len(inputs) - (end - start), len(inputs))
        expected += lp[loops[scored], scored, tokens[start:end]].sum()
    assert rolling[0] == pytest.approx(expected, abs=1e-3)

    fixed = OuroLM(pretrained=hf_dir, exit_at_loop=2)  # loops 1..2 only, loop 2's logits
    (logp, _), = fixed.loglikelihood([Instance("loglikelihood", {}, pairs[0], 0)])
    ids, n_context = encode("".join(pairs[0])), len(encode(pairs[0][0]))
    lp = log_probs(model, ids[:-1], 2)[1]
    assert logp == pytest.approx(lp[np.arange(n_context - 1, len(ids) - 1), ids[n_context:]].sum(), abs=1e-4)
    with pytest.raises(ValueError, match=r"exit_at_loop=5 must lie in 1\.\.3"):
        OuroLM(pretrained=hf_dir, exit_at_loop=5)


def write_tasks(directory, stop: str) -> list[str]:
    """Offline task YAMLs over DOCS: multiple choice, loglikelihood, rolling, generate_until(stop)."""
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n")
    bodies = {
        "ouro_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
                   "doc_to_target: answer\nmetric_list:\n  - metric: acc\n",
        "ouro_ll": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
                   "doc_to_target: ' {{continuation}}'\n"
                   "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
        "ouro_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        "ouro_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{context}}'\n"
                    f"generation_kwargs:\n  until: {json.dumps([stop])}\n  max_gen_toks: 8\n"
                    "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, body in bodies.items():
        (directory / f"{name}.yaml").write_text(f"task: {name}\n{common}{body}")
    return list(bodies)


@pytest.mark.slow
@pytest.mark.torch
def test_agrees_with_the_hf_backend_on_local_tasks(hf_dir, tmp_path):
    # A stop string the model really produces: two tokens from the middle of its first greedy continuation.
    free = OuroLM(pretrained=hf_dir, batch_size=4)
    request = Instance("generate_until", {}, (DOCS[0]["question"], {"until": [], "max_gen_toks": 8}), 0)
    (uncut,) = free.generate_until([request])
    out_ids = tok.load("ouro").encode(uncut, add_special_tokens=False).ids
    stop = free.tok_decode(out_ids[3:5])
    assert 0 < uncut.index(stop) and stop.strip()

    tasks = write_tasks(tmp_path, stop)
    manager = TaskManager(include_path=str(tmp_path))
    results = {}
    for backend, args in [("ouro_jax", f"pretrained={hf_dir},batch_size=4"),
                          ("hf", f"pretrained={hf_dir},trust_remote_code=True,dtype=float32,"
                                 "device=cpu,batch_size=4")]:  # both with their default prefix token
        results[backend] = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=tasks,
                                                   task_manager=manager, log_samples=True, bootstrap_iters=0)
    ours, theirs = results["ouro_jax"], results["hf"]
    for task in tasks:
        pairs = list(zip(ours["samples"][task], theirs["samples"][task], strict=True))
        if task == "ouro_gen":
            assert [a["filtered_resps"] for a, _ in pairs] == [b["filtered_resps"] for _, b in pairs]
            continue
        a, b = (np.concatenate([np.asarray(s["filtered_resps"], float).ravel() for s in side])
                for side in zip(*pairs, strict=True))
        print(f"{task}: max |ouro_jax - hf| = {np.abs(a - b).max():.2e} nats")  # the parity figure (-s)
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert ours["results"]["ouro_mc"]["acc,none"] == theirs["results"]["ouro_mc"]["acc,none"]
    assert ours["results"]["ouro_ll"]["acc,none"] == theirs["results"]["ouro_ll"]["acc,none"]
    assert ours["results"]["ouro_rolling"]["word_perplexity,none"] == pytest.approx(
        theirs["results"]["ouro_rolling"]["word_perplexity,none"], rel=1e-3)
    assert ours["samples"]["ouro_gen"][0]["filtered_resps"] == [uncut[:uncut.index(stop)]]


@pytest.mark.slow
def test_cli_unknown_task_is_one_line_error(hf_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["python"])
    with pytest.raises(SystemExit) as exit_info:
        lm_eval_cli.main(["prog", "--model_args", f"pretrained={hf_dir}", "--tasks", "no_such_task_xyz"])
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "error: Tasks not found: no_such_task_xyz"


def test_default_prefix_token_follows_the_hf_model(tmp_path):
    """lm-eval's `hf` model prefixes with the tokenizer's bos_token, else its eos_token (end of text)."""
    from ouro_jax.evaluate.lm_eval.model import default_prefix_token_id

    ouro = tok.load("ouro")
    assert default_prefix_token_id(str(tmp_path), ouro) == tok.ENDOFTEXT_ID  # no tokenizer_config.json
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    assert default_prefix_token_id(str(tmp_path), ouro) == tok.IM_END_ID
    config.write_text(json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"}))
    assert default_prefix_token_id(str(tmp_path), ouro) == tok.IM_START_ID
