"""notebooks/ouro_colab.ipynb runs headlessly with papermill (`-p SMOKE True`): a failing cell fails here."""

import os
import sys

import nbformat
import papermill
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "ouro_colab.ipynb")


def outputs(cell, kind):
    """The text of a cell's stream outputs, or its outputs carrying MIME type `kind`."""
    if kind == "stream":
        return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")
    return [o for o in cell.get("outputs", []) if kind in o.get("data", {})]


@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    source = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in source.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "SMOKE = False" in tagged[0].source
    assert all(f"\n{name} = " in tagged[0].source for name in ("TASKS", "LIMIT", "LOOPS"))
    assert any(c.source.startswith("## Benchmarks per loop") for c in source.cells)
    assert "colab.research.google.com" in source.cells[0].source

    # the kernel runs this interpreter's environment on the CPU, offline
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        executed = papermill.execute_notebook(NOTEBOOK, str(tmp_path / "out.ipynb"),
                                              parameters={"SMOKE": True}, kernel_name="python3",
                                              cwd=str(tmp_path), progress_bar=False)
    except papermill.PapermillExecutionError as err:
        pytest.fail(f"notebook cell failed: {err.ename}: {err.evalue}")

    text = "".join(outputs(c, "stream") for c in executed.cells if c.cell_type == "code")
    assert "interrupted: SIGINT" in text and "resumed from step" in text
    assert "perplexity per loop" in text and "mean depth" in text
    images = sum(len(outputs(c, "image/png")) for c in executed.cells if c.cell_type == "code")
    assert images == 6  # accuracy vs depth, exit histogram, per-loop, generation's exit histogram, and the
    # benchmarks' metric vs loops and metric vs mean loops
    assert "evaluation: float32, batch 8: CPUs" in text
    # benchmarks per loop: the time per task and the table, loops 1..5 of a T = 4 model and Q-exit q=0.5
    assert "loop_smoke_mc: acc,none at loops" in text and "loop_smoke_rolling: word_perplexity" in text
    tables = [o["data"]["text/markdown"] for c in executed.cells if c.cell_type == "code"
              for o in outputs(c, "text/markdown")]
    table = [t for t in tables if "| loop_smoke_mc | acc,none |" in t]
    assert len(table) == 1 and "**T=4** | T=5 | Q-exit q=0.5 |" in table[0]
    assert "| loop_smoke_rolling | word_perplexity,none |" in table[0]
    assert (tmp_path / "runs" / "colab_demo" / "checkpoints").is_dir()
