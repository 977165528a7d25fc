"""`python -m ouro_jax.evaluate`: per-loop metrics and exit rules against a float64 recomputation from the
model's full forward, exit rules on hand-made signals, text data, plots, the CLI and its errors."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ouro_jax import run
from ouro_jax.convert.pretrained import save_pretrained
from ouro_jax.evaluate import data, metrics, plots, policies
from ouro_jax.model.config import OuroConfig, tiny
from ouro_jax.model.ouro import Ouro
from ouro_jax.train import recipes
from ouro_jax.train.config import model_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@functools.cache
def small_model(vocab_size=16, seed=0, gate_scale=3.0):
    """A tiny random Ouro whose exit gate is scaled up, so tokens exit at different loops."""
    model = Ouro(tiny(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, total_ut_steps=3), rngs=nnx.Rngs(seed))
    kernel = model.early_exit_gate.kernel
    kernel[...] = gate_scale * jax.random.normal(jax.random.key(seed + 1), kernel.shape) / np.sqrt(32)
    return model


def packed_batch(rng, rows=3, seq_len=12, vocab=16):
    """A batch like the pipeline's: row 0 one document, row 1 two packed documents (positions restart),
    row 2 padding only (masks 0); answers at a few positions."""
    ids = rng.integers(0, vocab, (rows, seq_len)).astype(np.int32)
    targets = rng.integers(0, vocab, (rows, seq_len)).astype(np.int32)
    segment_ids = np.ones((rows, seq_len), np.int32)
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1))
    cut = seq_len // 2
    segment_ids[1, cut:] = 2
    positions[1, cut:] = np.arange(seq_len - cut)
    segment_ids[2] = 0
    loss_mask = (segment_ids > 0).astype(np.int32)
    loss_mask[0, -1] = 0
    answer_mask = np.zeros_like(loss_mask)
    answer_mask[0, [3, 7]] = 1
    answer_mask[1, -1] = 1
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "answer_mask": answer_mask,
            "segment_ids": segment_ids, "positions": positions}


def between(values, count):
    """`count` thresholds strictly between distinct sorted values (never equal to one)."""
    v = np.unique(np.asarray(values, np.float64))
    mids = (v[1:] + v[:-1]) / 2
    return tuple(float(x) for x in mids[np.linspace(0, len(mids) - 1, count).astype(int)])


@functools.partial(nnx.jit, static_argnames="num_loops")
def _call(model, input_ids, positions, segment_ids, num_loops):
    return model(input_ids, positions=positions, segment_ids=segment_ids, num_loops=num_loops)


def full_forward(model, batch, num_loops):
    """`model(...)`: every loop's logits, gate logits and normed states."""
    return _call(model, *(jnp.asarray(batch[k]) for k in ("input_ids", "positions", "segment_ids")),
                 num_loops=num_loops)


def oracle(model, batches, grid, num_loops):
    """The same statistics from `model(...)` (every loop's logits, gates and states) in float64 numpy."""
    sums = {}

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)

    rules = grid.rules()
    for batch in batches:
        out = full_forward(model, batch, num_loops)
        logits = np.asarray(out.logits, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        t = batch["targets"]
        ce = -np.take_along_axis(logp, np.broadcast_to(t[None, ..., None], (*logp.shape[:-1], 1)), -1)[..., 0]
        correct = (logits.argmax(-1) == t).astype(np.float64)
        mask, answers = batch["loss_mask"].astype(np.float64), batch["answer_mask"].astype(np.float64)
        lam = 1 / (1 + np.exp(-np.asarray(out.gate_logits, np.float64)))
        survival = np.cumprod(1 - lam, axis=0)
        pdf = np.concatenate([lam[:1], lam[1:-1] * survival[:-2], survival[-2:-1]], axis=0)
        cdf = 1 - survival
        h = np.asarray(out.hidden_states, np.float64)
        change = np.linalg.norm(h[1:] - h[:-1], axis=-1)
        relative = change / np.linalg.norm(h[:-1], axis=-1)
        add("tokens", mask.sum())
        add("answers", answers.sum())
        add("ce", (ce * mask).sum((1, 2)))
        add("acc", (correct * mask).sum((1, 2)))
        add("answer_acc", (correct * answers).sum((1, 2)))
        add("pdf", (pdf * mask).sum((1, 2)))
        add("mean_exit", ((np.arange(1, num_loops + 1)[:, None, None] * pdf).sum(0) * mask).sum())
        for p, (kind, threshold) in enumerate(rules):
            if kind == "q_exit":
                fired = cdf[:-1] >= threshold
                loop = np.where(fired.any(0), fired.argmax(0), num_loops - 1)
            else:
                fired = (change if kind == "hidden_delta" else relative) < threshold
                loop = np.where(fired.any(0), 1 + fired.argmax(0), num_loops - 1)
            pick = lambda x, loop=loop: np.take_along_axis(x, loop[None], 0)[0]
            add(f"{p}_ce", (pick(ce) * mask).sum())
            add(f"{p}_acc", (pick(correct) * mask).sum())
            add(f"{p}_depth", ((loop + 1) * mask).sum())
            add(f"{p}_answer_acc", (pick(correct) * answers).sum())
            add(f"{p}_hist", (np.eye(num_loops)[loop] * mask[..., None]).sum((0, 1)))
    return sums


@pytest.mark.slow
def test_metrics_equal_a_float64_recomputation_and_compile_once(monkeypatch):
    model = small_model()
    rng = np.random.default_rng(0)
    batches = [packed_batch(rng) for _ in range(2)]
    num_loops = model.config.total_ut_steps + 1  # one extrapolated loop
    h = np.asarray(full_forward(model, batches[0], num_loops).hidden_states, np.float64)
    change = np.linalg.norm(h[1:] - h[:-1], axis=-1)
    grid = policies.Grid(q=(0.2, 0.5, 0.8), hidden_delta=between(change, 3),
                         hidden_delta_relative=between(change / np.linalg.norm(h[:-1], axis=-1), 3))

    traces = []
    original = metrics.batch_sums
    monkeypatch.setattr(metrics, "batch_sums", lambda *a, **k: traces.append(1) or original(*a, **k))
    done = []
    result = metrics.evaluate(model, batches, grid, num_loops=num_loops, progress=done.append)
    assert traces == [1] and done == [1, 2]  # one compilation for both batches; progress per batch

    want = oracle(model, batches, grid, num_loops)
    tokens, answers = want["tokens"], want["answers"]
    assert (result["num_tokens"], result["num_answers"]) == (tokens, answers) == (46.0, 6.0)  # 2 x (11 + 12)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=2e-6)
    close(result["ce_per_loop"], want["ce"] / tokens)
    close(result["perplexity_per_loop"], np.exp(want["ce"] / tokens))
    close(result["accuracy_per_loop"], want["acc"] / tokens)
    close(result["answer_accuracy_per_loop"], want["answer_acc"] / answers)
    close(result["exit_pdf_per_loop"], want["pdf"] / tokens)
    close(result["mean_exit_loop"], want["mean_exit"] / tokens)
    assert len(result["ce_per_loop"]) == num_loops and result["trained_loops"] == num_loops - 1

    static, swept = result["rules"][:num_loops], result["rules"][num_loops:]
    assert [(r["kind"], r["mean_depth"]) for r in static] == [("static", t) for t in range(1, num_loops + 1)]
    close([r["ce"] for r in static], want["ce"] / tokens)
    assert [(r["kind"], r["threshold"]) for r in swept] == [(k, pytest.approx(v)) for k, v in grid.rules()]
    for p, rule in enumerate(swept):
        close(rule["ce"], want[f"{p}_ce"] / tokens)
        close(rule["accuracy"], want[f"{p}_acc"] / tokens)
        close(rule["mean_depth"], want[f"{p}_depth"] / tokens)
        close(rule["answer_accuracy"], want[f"{p}_answer_acc"] / answers)
        close(rule["exit_histogram"], want[f"{p}_hist"] / tokens)
    depths = {round(r["mean_depth"], 6) for r in swept}
    assert len(depths) > 3  # the rules really send tokens out at different loops

    table = metrics.markdown_table(result).splitlines()
    assert len(table) == 2 + num_loops + len(grid.rules())
    assert "loop 4 (extrapolated)" in table[2 + 3] and table[2].startswith("| loop 1 | 1.00 |")


def test_training_evaluation_and_the_evaluate_command_read_the_same_numbers(monkeypatch):
    """One per-loop readout: training's eval step and `metrics.evaluate` give the same per-loop figures
    on one batch, with the LM head in chunks of positions (3 chunks of 4 per row here)."""
    from ouro_jax import objective
    from ouro_jax.train.step import make_eval_step

    monkeypatch.setattr(objective, "CE_CHUNK", 4)
    model = small_model(seed=3)
    batch = packed_batch(np.random.default_rng(5))
    graphdef, params = nnx.split(model)
    train_side = jax.device_get(jax.jit(make_eval_step(graphdef))(params, batch))
    grid = policies.Grid(q=(0.5,), hidden_delta=(), hidden_delta_relative=())
    ours = metrics.evaluate(model, [batch], grid)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-6, atol=1e-7)
    for key in ("ce_per_loop", "accuracy_per_loop", "exit_pdf_per_loop", "answer_accuracy_per_loop",
                "mean_exit_loop", "entropy", "weighted_ce"):
        close(ours[key], train_side[key])
    assert ours["num_tokens"] == train_side["num_tokens"] == 23


def test_exit_rules_on_hand_made_signals():
    # gate logits [L=4, 1, 2]: token 0 lambda = 0.5 every loop (CDF 0.5, 0.75, 0.875); token 1 exits late.
    gate = jnp.asarray([[[0.0, -9.0]], [[0.0, -9.0]], [[0.0, 9.0]], [[0.0, 9.0]]], jnp.float32)
    # hidden [L, 1, 2, D=2]: token 0 moves by 4, 2, 0.5 between loops; token 1 by 1, 1, 1 from norm 10.
    h0 = [[0, 0], [4, 0], [4, 2], [4, 2.5]]
    h1 = [[10, 0], [10, 1], [10, 2], [10, 3]]
    hidden = jnp.asarray([[[a, b]] for a, b in zip(h0, h1, strict=True)], jnp.float32)
    loops = policies.sweep_exit_loops(gate, hidden, jnp.asarray([0.4, 0.7, 0.9]), jnp.asarray([1.0, 3.0]),
                                      jnp.asarray([0.05, 0.11]))
    expected = [
        [0, 2],  # q=0.4: token 0 CDF(1) = 0.5; token 1 CDF(3) ~ 1
        [1, 2],  # q=0.7: CDF(2) = 0.75
        [3, 2],  # q=0.9: token 0 never reaches 0.9 before the last loop
        [3, 3],  # |dh| < 1: token 0 at loop 4 (0.5); token 1 never (1 is not < 1)
        [2, 1],  # |dh| < 3: token 0 at loop 3 (2); token 1 at loop 2 (1)
        [3, 3],  # |dh|/|h| < 0.05: token 1: 1/10, 1/10.05, 1/10.2 are all > 0.05
        [3, 1],  # |dh|/|h| < 0.11: token 0: 2/4 = 0.5, 0.5/4.47 = 0.112 -> never; token 1: 0.1 at loop 2
    ]
    assert np.asarray(loops)[:, 0].tolist() == expected


def make_run(path, *, vocab_size=4, seq_len=16, total_ut_steps=2):
    """A run directory (config.json + a step-0 checkpoint) of a random model on p-hop data."""
    config = OuroConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=16, rope_theta=10_000.0,
                        max_position_embeddings=seq_len, total_ut_steps=total_ut_steps)
    c = recipes.demo(steps=1)
    c.model = model_dict(config)
    c.data.update(seq_len=seq_len, batch_size=8, eval_batches=2)
    path.mkdir(parents=True)
    run.write_config(path, c)
    model = Ouro(config, rngs=nnx.Rngs(0))
    run.save_params(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)), step=0)
    return path


def cli(*args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "ouro_jax.evaluate", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_cli_on_a_run_writes_table_metrics_and_plots(tmp_path):
    run_dir = make_run(tmp_path / "run")
    out = tmp_path / "eval"
    proc = cli(f"--model={run_dir}", f"--output_dir={out}", "--extra_loops=1", "--q=0.3,0.6")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "metrics.json").read_text())
    assert result["num_loops"] == 3 and result["trained_loops"] == 2
    assert result["num_tokens"] > 0 and result["num_answers"] == 16  # 2 batches x 8 rows, one answer each
    assert [r["label"] for r in result["rules"]][:5] == ["loop 1", "loop 2", "loop 3", "Q-exit q=0.3",
                                                          "Q-exit q=0.6"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(result["rules"]) and "| loop 3 (extrapolated) |" in proc.stdout
    for name in ("accuracy_vs_depth", "exit_histogram", "per_loop"):
        blob = (out / f"{name}.png").read_bytes()
        assert blob.startswith(PNG) and len(blob) > 10_000


@pytest.mark.parametrize("case", ["missing model", "no text", "hf without data"])
def test_cli_errors_are_one_line(tmp_path, case):
    if case == "missing model":
        args, expected = [f"--model={tmp_path}/nope"], "no such directory"
    elif case == "no text":
        (tmp_path / "empty.txt").write_text("\n\n   \n\n")
        args, expected = [f"--model={make_run(tmp_path / 'run')}", f"--data={tmp_path}/empty.txt"], "no text"
    else:
        hf_dir = save_pretrained(small_model(), tmp_path / "hf", dtype="float32")
        args, expected = [f"--model={hf_dir}"], "pass --data"
    proc = cli(*args, f"--output_dir={tmp_path}/out")
    assert proc.returncode != 0 and not (tmp_path / "out").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]


def test_text_data_scores_every_document(tmp_path):
    from ouro_jax import tokenizer as tok

    docs = ["The first document is short.", "A second one, " * 40 + "much longer than a row.", "Third."]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs) + "\n")
    batches, description = data.text_batches(str(path), vocab_size=49152, field="body", batch_size=2,
                                             seq_len=32)
    assert description.startswith("3 documents")
    assert {b["input_ids"].shape for b in batches} == {(2, 32)}
    encoder = tok.load("ouro")
    text_tokens = sum(len(encoder.encode(d, add_special_tokens=False).ids) for d in docs)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == text_tokens  # each token predicts the next
    with pytest.raises(ValueError, match="vocab_size is 16"):
        data.text_batches(str(path), vocab_size=16, field="body")


def test_loop_figures_take_the_training_evaluation_arrays(tmp_path):
    eval_metrics = {"ce_per_loop": np.array([2.0, 1.5, 1.2, 1.1]),
                    "accuracy_per_loop": np.array([.3, .5, .7, .8]),
                    "exit_pdf_per_loop": np.array([.1, .2, .3, .4]),
                    "answer_accuracy_per_loop": np.array([.2, .4, .9, .95])}
    figs = plots.loop_figures(eval_metrics, title="step 100")
    assert set(figs) == {"per_loop", "exit_histogram"}
    ce_axis, acc_axis = figs["per_loop"].axes
    np.testing.assert_allclose(ce_axis.lines[0].get_ydata(), eval_metrics["ce_per_loop"])
    np.testing.assert_allclose(acc_axis.lines[1].get_ydata(), 100 * eval_metrics["answer_accuracy_per_loop"])
    bars = [p.get_height() for p in figs["exit_histogram"].axes[0].patches]
    np.testing.assert_allclose(bars, 100 * eval_metrics["exit_pdf_per_loop"])
    for path in plots.save(figs, tmp_path):
        assert open(path, "rb").read(8) == PNG
