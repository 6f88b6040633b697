"""The quickstart notebook runs top to bottom; the main job runs and reports every form."""

from __future__ import annotations

import pathlib

import pytest

from complexity_jax.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes():
    # The test extra installs these; the GPU machine, which runs only the ``gpu`` tests, may lack them.
    nbformat = pytest.importorskip("nbformat")
    NotebookClient = pytest.importorskip("nbclient").NotebookClient
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "max difference" in outputs and "linear" in outputs


def test_main_job_checks_every_form(capsys):
    code = main(["--seq-len", "96", "--hidden-size", "64", "--num-heads", "4", "--num-kv-heads", "2",
                 "--repeats", "1"])
    table = capsys.readouterr().out
    assert code == 0
    for form in ("flash", "sliding_window", "sparse", "linear", "multiscale"):
        assert form in table
    assert "FAILED" not in table
