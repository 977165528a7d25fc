"""notebooks/ouro_colab.ipynb runs headlessly with papermill (`-p SMOKE True`): a failing cell fails here."""

import os
import sys

import nbformat
import papermill
import pytest

pytestmark = pytest.mark.slow  # runs the notebook in a kernel process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "ouro_colab.ipynb")


def outputs(cell, kind):
    """The text of a cell's stream outputs, or its outputs carrying MIME type `kind`."""
    if kind == "stream":
        return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")
    return [o for o in cell.get("outputs", []) if kind in o.get("data", {})]


def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    source = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in source.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "SMOKE = False" in tagged[0].source
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
    assert images == 4  # accuracy vs depth, exit histogram, per-loop, generation's exit histogram
    assert (tmp_path / "runs" / "colab_demo" / "checkpoints").is_dir()
