"""The package map is the architecture: every import inside hfbridge points down this list, never up.

server -> engine -> core/worker -> model/attention (README, "How it is built"). A package may import its own modules
and any package of a lower rank; an import of a higher rank (even a lazy one inside a function) fails here. A module
named in a string ("hfbridge.native_overrides.llama", for importlib) counts as an import too: registries that import
lazily must name their modules in full, where this check sees them."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

# rank: packages (a top-level module such as hfbridge.config counts as its own package)
LAYERS = {
    # shared types and helpers, imported by everyone
    0: ("config", "errors", "outputs", "version", "compilation", "paths", "native_build", "cpu_features"),
    1: ("attention_backends", "sample"),
    2: ("pooling", "quantization", "multimodal"),
    3: ("native_overrides", "parallel", "lora"),
    4: ("model",),
    5: ("core",),
    6: ("worker", "structured_output"),
    7: ("engine",),
    8: ("server",),
    9: ("entrypoints", "sampling_params"),
}
_MODULE_NAME = re.compile(r"^hfbridge(\.[a-z_]+)+$")
RANK = {package: rank for rank, packages in LAYERS.items() for package in packages}


def _package_of(module: str) -> str | None:
    """hfbridge.core.scheduler -> core; None for hfbridge itself and its __main__ (they re-export every layer)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "hfbridge" or parts[1] == "__main__":
        return None
    return parts[1]


def _hfbridge_modules() -> list[tuple[str, Path]]:
    modules = []
    for package in ("hfbridge", *(f"hfbridge.{p}" for p in RANK)):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:  # a module (config.py), listed with hfbridge
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules.append((name, path))
    return sorted(set(modules))


def _imports(path: Path, module: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import: resolve against this module's package
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            names.append(base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.match(node.value):
            names.append(node.value)  # importlib.import_module("hfbridge....") and the registries that feed it
    return [n for n in names if n == "hfbridge" or n.startswith("hfbridge.")]


def test_every_package_has_a_rank():
    packages = {_package_of(name) for name, _ in _hfbridge_modules()} - {None}
    assert packages, "found no hfbridge modules"
    assert packages <= set(RANK), f"packages without a rank in LAYERS: {sorted(packages - set(RANK))}"


@pytest.mark.parametrize("module,path", _hfbridge_modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_upward_import(module, path):
    own = _package_of(module)
    if own is None:
        return
    upward = []
    for imported in _imports(path, module):
        target = _package_of(imported)
        if target is None:
            upward.append(imported)  # `import hfbridge` pulls in everything
        elif target != own and RANK[target] > RANK[own]:
            upward.append(imported)
    assert not upward, f"{module} (rank {RANK[own]}) imports upward: {upward}"
