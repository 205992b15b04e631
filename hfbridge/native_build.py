"""Hand-written C kernels (csrc/: paged decode attention, the projections' GEMM), built with the system C compiler
on first use and loaded with ctypes, which lets go of the GIL while a kernel runs.

A build lands in $HFBRIDGE_CACHE_DIR/kernels under a key of the sources, the command, the compiler's version and
the macros its -march defines (the instruction sets it targets, on every architecture): later processes load it in
milliseconds, another machine sharing the folder builds its own. $HFBRIDGE_KERNEL_MARCH (default "native") picks
another target, e.g. x86-64-v3 for an AVX2-level build. It is built aside and renamed into place, so processes that race (ranks) each get a whole file. With no C
compiler, or one that fails, `load_library` returns None (logged once per source) and callers run their torch code.
Kernels run on the OpenMP runtime torch already loaded (libgomp.so.1 is mapped once), at the thread count given."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from hfbridge.paths import cache_root

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")  # the .c files and the header they share
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", f"-I{CSRC}")


@functools.cache
def load_library(name: str, defines: tuple[str, ...] = (), vector_bytes: int | None = None) -> ctypes.CDLL | None:
    """The library built from csrc/<name> with `defines` (e.g. ("-DHEAD_DIM=64",)), or None where it cannot be
    built. Its vectors have the machine's width (csrc/simd.h), or `vector_bytes` (16, 32 or 64: the tests build
    every width on any machine)."""
    if vector_bytes is not None:
        defines = (*defines, f"-DHFBRIDGE_VECTOR_BYTES={vector_bytes}")
    source = CSRC / name
    try:
        lib = ctypes.CDLL(str(_build(source, defines)))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("Could not build the C kernels of %s (%s); torch code runs instead", source.name, exc)
        return None
    warn_if_two_openmp_runtimes()
    return lib


# OpenMP runtimes by family: GNU's (gcc, torch's Linux wheels), LLVM's (clang), Intel's (icc, some torch builds)
OPENMP_RUNTIMES = {"libgomp": "GNU", "libomp": "LLVM", "libiomp5": "Intel"}


def openmp_runtimes(maps: str | None = None) -> set[str]:
    """The OpenMP runtime families mapped into this process (/proc/self/maps; empty where it cannot be read)."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return set()
    names = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    return {family for prefix, family in OPENMP_RUNTIMES.items() for name in names
            if name.startswith((prefix + ".", prefix + "-"))}  # libgomp.so.1, or a wheel's libgomp-a34b3233.so.1


@functools.cache
def warn_if_two_openmp_runtimes(maps: str | None = None) -> bool:
    """Warn once when the kernels brought a second OpenMP runtime next to torch's: each keeps its own thread pool,
    and the two pools' spinning threads compete for the same cores. True when it warned."""
    found = openmp_runtimes(maps)
    if len(found) < 2:
        return False
    logger.warning(
        "Two OpenMP runtimes are loaded (%s): hfbridge's C kernels and torch each run their own thread pool, which "
        "slows both. Build the kernels with the compiler torch's runtime belongs to (for torch's Linux wheels: gcc, "
        "e.g. CC=gcc) and clear %s", ", ".join(sorted(found)), cache_root() / "kernels")
    return True


def declare(lib: ctypes.CDLL | None, signatures: dict[str, tuple[list, type | None]]) -> ctypes.CDLL | None:
    """`lib` with its functions' ctypes signatures set, {name: (argtypes, restype)}; None stays None (no build)."""
    if lib is not None:
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
    return lib


def _build(source: Path, defines: tuple[str, ...]) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (set CC or install gcc)")
    march = f"-march={os.environ.get('HFBRIDGE_KERNEL_MARCH') or 'native'}"
    command = [compiler, march, *FLAGS, *defines]
    version = _compiler_version(compiler)
    headers = [h.read_text() for h in sorted(CSRC.glob("*.h"))]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, *command, version,
                                    _target_macros(compiler, march)]).encode())
    key = key.hexdigest()[:16]
    tag = "_".join(d.removeprefix("-D").rsplit("=", 1)[-1] for d in defines)  # "64_KV_BF16"
    path = cache_root() / "kernels" / f"{source.stem}{'_' + tag if tag else ''}_{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        result = subprocess.run([*command, "-o", str(built), str(source)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise OSError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, path)
    logger.info("Built %s in %.1fs: %s", source.name, time.perf_counter() - start, path)
    return path


@functools.cache
def _compiler_version(compiler: str) -> str:
    """Part of every build's cache key; asked once per process, not once per library."""
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout


@functools.cache
def _target_macros(compiler: str, march: str) -> str:
    """What the build targets: the macros the compiler predefines for `march` (__AVX512BF16__, __ARM_FEATURE_SVE,
    ...), which name the instruction sets on every architecture (arm64's /proc/cpuinfo has no flags line)."""
    result = subprocess.run([compiler, march, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise OSError(f"{compiler} {march} failed: {result.stderr.strip()[-2000:]}")
    return "".join(sorted(result.stdout.splitlines(keepends=True)))
