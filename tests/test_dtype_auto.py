"""dtype="auto" on CPU (vLLM-CPU's rule, as issue 35 states it): a 16-bit checkpoint runs in bfloat16 where the
CPU has bfloat16 dot products, anything else in float32; a dtype asked for by name is kept."""
import copy
import platform

import pytest
import torch
from tiny_models import save_model

from hfbridge.cpu_features import native_bfloat16
from hfbridge.engine import engine_args
from hfbridge.engine.engine_args import EngineArgs


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    """The tiny Llama saved in each dtype (its config.json names the dtype, as a real checkpoint's does)."""
    model = tiny_llama[0]
    saved = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        folder = tmp_path_factory.mktemp(f"llama_{str(dtype).removeprefix('torch.')}")
        saved[dtype] = str(save_model(copy.deepcopy(model).to(dtype), folder))
    return saved


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_checkpoint_and_the_cpu(checkpoints, monkeypatch, native):
    monkeypatch.setattr(engine_args, "native_bfloat16", lambda: native)
    resolved = {dtype: EngineArgs(model=folder, device="cpu").create_engine_config().model_config.dtype
                for dtype, folder in checkpoints.items()}
    sixteen = torch.bfloat16 if native else torch.float32
    assert resolved == {torch.float32: torch.float32, torch.float16: sixteen, torch.bfloat16: sixteen}
    named = EngineArgs(model=checkpoints[torch.bfloat16], device="cpu", dtype="float32").create_engine_config()
    assert named.model_config.dtype == torch.float32


def test_native_bfloat16_matches_what_the_kernel_reports():
    """The oracle: the CPU flags Linux lists (x86-64: avx512_bf16 or amx_bf16; arm64: bf16)."""
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this OS")
    words = {word for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
             for word in line.split(":", 1)[1].split()}
    if platform.machine() == "x86_64":
        assert native_bfloat16() == bool(words & {"avx512_bf16", "amx_bf16"})
    elif platform.machine() == "aarch64":
        assert native_bfloat16() == ("bf16" in words)
    else:
        pytest.skip(f"no bfloat16 rule for {platform.machine()}")
