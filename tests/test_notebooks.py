"""Every research notebook runs top to bottom on its quick settings (SERVESIM_QUICK=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_quick(path: Path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not TRACES.is_dir():
        pytest.skip("the shared traces are not beside the checkout")
    monkeypatch.setenv("SERVESIM_QUICK", "1")
    monkeypatch.setenv("SERVESIM_TRACES", str(TRACES))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
