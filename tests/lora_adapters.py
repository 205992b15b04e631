"""PEFT adapters made in the tests, and PEFT's own model as their oracle (peft is a test dependency only)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: torch.nn.Module, folder: Path, r: int, target_modules, seed: int, lora_alpha: int | None = None,
                 use_rslora: bool = False) -> Path:
    """A PEFT LoRA adapter over `base` with random A and B (PEFT starts B at zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha or 2 * r, target_modules=target_modules, lora_dropout=0.0,
                        use_rslora=use_rslora)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(folder)
    return folder


def peft_model(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """The oracle: PEFT's own model of the adapter over (a copy of) the base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def standard_adapters(base: torch.nn.Module, root: Path) -> dict[str, Path]:
    """Three adapters of different ranks and target sets over the tiny Llama: `all` (r=8, every projection),
    `qv` (r=4, q_proj and v_proj), `regex` (r=8, o_proj and down_proj by a regex, rsLoRA scaling)."""
    return {
        "all": make_adapter(base, root / "all", 8, ALL_PROJECTIONS, seed=1),
        "qv": make_adapter(base, root / "qv", 4, ["q_proj", "v_proj"], seed=2),
        "regex": make_adapter(base, root / "regex", 8, r".*\.(o_proj|down_proj)", seed=3, use_rslora=True),
    }
