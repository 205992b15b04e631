"""The notebooks in notebooks/ run top to bottom in a fresh kernel, offline, and leave nothing behind; they are
stored without outputs. A failing cell fails the test with that cell's traceback (nbclient's
CellExecutionError); the notebooks' own asserts (Paris, greedy equality with Transformers, ...) are the oracle.
"""
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = [
    "01_quickstart.ipynb",
    "02_custom_model.ipynb",
    "03_serving.ipynb",
    "04_embeddings_and_rerank.ipynb",
    "05_scaling_out.ipynb",
    "06_structured_outputs.ipynb",
    "07_vision.ipynb",
]
# The longest cell converts the default model on first use (30-60 s on 2 cores) or, in 03, waits for the
# server to load it (the notebook gives up after 240 s): 300 s per cell is generous, and still bounded.
CELL_TIMEOUT_S = 300


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {index} of {name} holds outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # What users get: the background torch.compile on (the rest of the suite turns it off in conftest.py).
        "HFBRIDGE_ENFORCE_EAGER": "0",
        "VLLM_CPU_KVCACHE_SPACE": "",  # the default KV-cache budget (conftest.py lowers it for the rest)
        # One intra-op thread: on a small shared runner, two OpenMP threads wait on each other whenever one is
        # descheduled, and decoding got 10-50x slower than with one.
        "OMP_NUM_THREADS": "1",
        # Temporary folders land here, so we can check that the notebook removed its own.
        "TMPDIR": str(tmp),
        # Caches that are not the notebooks' to clean: torch's compile cache (created in TMPDIR at import) and
        # the remote code Transformers copies (notebook 02 points it into its own folder as well).
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torchinductor"),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
    }
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)  # raises on the first cell error
    assert list(cwd.iterdir()) == [], f"{name} left files in its working directory"
    # Jupyter kills a kernel that still has child processes at shutdown (multiprocessing's resource tracker and the
    # tp workers' fork server), so multiprocessing's exit hook never removes its own pymp-* folder (Python < 3.12
    # keeps the fork server's socket there): not the notebook's to clean.
    left = [p for p in tmp.iterdir() if not (p.name.startswith("pymp-") and sys.version_info < (3, 12))]
    assert left == [], f"{name} left temporary files"
