"""The notebooks in notebooks/ run top to bottom (nbclient, a fresh kernel of this interpreter) at their
default, small settings; their own assertion cells check the numbers (closed forms, check_grads)."""
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the optional dependency nbformat (test extra)")
nbclient = pytest.importorskip("nbclient", reason="needs the optional dependency nbclient (test extra)")
pytest.importorskip("ipykernel", reason="needs the optional dependency ipykernel (test extra)")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _run(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        f"{name} is committed with outputs; clear them"
    env_path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    os.environ["PATH"] = env_path  # the kernel is this interpreter's (ipykernel's native "python3" kernel)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, errors
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                   if out.output_type == "stream")


def test_scan_gradcheck_notebook(tmp_path):
    text = _run("scan_gradcheck.ipynb", tmp_path)
    for impl in ("reference", "associative", "chunked", "chunked_associative"):
        assert f"{impl}" in text and "check_grads" in text
    assert text.count(": ok") >= 4 + 2  # every selective-scan impl and both SSD impls
    assert "check_grads caught it" in text


def test_icl_exploration_notebook(tmp_path):
    text = _run("icl_exploration.ipynb", tmp_path)
    assert "least sq." in text and "label 2 corrupted" in text
