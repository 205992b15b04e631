"""`import hfbridge` and `hfbridge --help` load neither torch nor Transformers (seconds of import time); the
public names still resolve on first use. Checked in a fresh interpreter: its sys.modules is the oracle."""
import json
import subprocess
import sys

import hfbridge

HEAVY = ("torch", "transformers", "aiohttp", "numpy")


def _modules_loaded_after(code: str) -> list[str]:
    probe = f"""
import contextlib, io, json, sys
{code}
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_hfbridge_loads_no_torch():
    assert _modules_loaded_after("import hfbridge; hfbridge.__version__") == []


def test_cli_help_loads_no_torch():
    code = """
from hfbridge.entrypoints.cli import main
for argv in (["--help"], ["serve", "--help"], ["generate", "--help"], ["check", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "Usage:" in out.getvalue(), argv
"""
    assert _modules_loaded_after(code) == []


def test_every_public_name_resolves():
    from hfbridge import LLM, PoolingParams, SamplingParams  # noqa: F401 - the documented spelling

    for name in hfbridge.__all__:
        assert getattr(hfbridge, name) is not None, name
    assert set(hfbridge.__all__) <= set(dir(hfbridge))
    assert hfbridge.SamplingParams is SamplingParams
    assert _modules_loaded_after("from hfbridge import LLM")[:2] == ["torch", "transformers"]
