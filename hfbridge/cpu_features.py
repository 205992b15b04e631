"""What this machine's CPU computes natively, for the defaults that depend on it (dtype="auto")."""
from __future__ import annotations

import functools
import platform
import subprocess
import sys

import torch


@functools.cache
def native_bfloat16() -> bool:
    """True where the CPU has bfloat16 dot-product instructions: AVX512-BF16 or AMX on x86-64, the BF16 extension
    on arm64 (Linux lists it in /proc/cpuinfo's Features, macOS in sysctl hw.optional.arm.FEAT_BF16)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if machine in ("aarch64", "arm64"):
        if sys.platform == "darwin":
            try:
                answer = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                        text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return False
            return answer.strip() == "1"
        try:
            with open("/proc/cpuinfo") as f:
                return any(line.startswith("Features") and "bf16" in line.split(":", 1)[1].split()
                           for line in f)
        except OSError:
            return False
    return False
