"""The notebooks run top to bottom and are committed with their outputs; the main job checks every form and says
which path ran."""

from __future__ import annotations

import pathlib

import pytest

from complexity_jax import __main__ as main_job
from complexity_jax.profiling import kernel_paths

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# What each notebook must show once executed: a figure, and the text its cells print.
EXPECTED = {
    "quickstart.ipynb": ("max difference", "linear"),
    "benchmarks.ipynb": ("NVIDIA H200", "cudnn"),
    "training.ipynb": ("final loss", "multiscale"),
    "sharding.ipynb": ("sharded == unsharded", "context parallel"),
}


def outputs_of(notebook) -> tuple[str, int]:
    """The text the code cells printed, and how many PNG figures they drew."""
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    return text, figures


def test_every_notebook_has_expectations():
    assert {path.name for path in NOTEBOOKS} == set(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_its_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell was never run: execute and save the notebook"
    text, figures = outputs_of(notebook)
    assert figures >= 1 and all(expected in text for expected in EXPECTED[path.name])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
    # The test extra installs these; the GPU machine, which runs only the ``gpu`` tests, may lack them.
    nbformat = pytest.importorskip("nbformat")
    NotebookClient = pytest.importorskip("nbclient").NotebookClient
    pytest.importorskip("matplotlib")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    text, figures = outputs_of(notebook)
    assert figures >= 1
    for expected in EXPECTED[path.name]:
        assert expected in text


def test_main_job_checks_every_form_and_names_its_path(capsys):
    code = main_job.main(["--seq-len", "96", "--hidden-size", "64", "--num-heads", "4", "--num-kv-heads", "2",
                          "--repeats", "1"])
    table = capsys.readouterr().out
    assert code == 0 and "FAILED" not in table
    rows = [line for line in table.splitlines() if line.split(" ", 1)[0] in main_job.LAYERS]
    # Off a GPU: each form on the XLA path at the requested size, then the Pallas kernels in interpret mode.
    assert [row.split()[0] for row in rows] == list(main_job.LAYERS) * 2
    assert all(" XLA " in row and " 1 x 96 " in row for row in rows[:5])
    assert all(" Pallas-Triton interpret " in row and " ok" in row for row in rows[5:])


def test_main_job_fails_on_a_wrong_output(monkeypatch, capsys):
    """The check is real: a layer whose output is off by a few percent is reported FAILED and the exit code is 1."""
    real_run = main_job.run
    monkeypatch.setattr(main_job, "run", lambda job: main_job.dataclasses.replace(real_run(job), output_error=0.05))
    assert main_job.main(["--forms", "flash", "--seq-len", "32", "--hidden-size", "32", "--num-heads", "2",
                          "--repeats", "1", "--no-interpret"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_kernel_paths_names_the_backend_that_a_layer_traces():
    import jax
    import jax.numpy as jnp

    from complexity_jax import CUDA

    x = jnp.ones((1, 32, 32))
    params = CUDA.flash(hidden_size=32, num_heads=2, implementation="xla").init(jax.random.key(0), x)
    for implementation, interpret, expected in [("xla", False, "XLA"), ("pallas_triton", False, "Pallas-Triton"),
                                                ("pallas", True, "Pallas-Triton interpret")]:
        layer = CUDA.flash(hidden_size=32, num_heads=2, implementation=implementation, interpret=interpret)
        assert kernel_paths(lambda p: layer.apply(p, x)[0], params) == expected
