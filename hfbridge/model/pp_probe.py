"""Does splitting a model at its pipeline plan keep its output? Run a tiny random copy whole, then as its stages
(one copy per stage, split exactly as the workers split it, hidden states handed on), and compare.

A plan only says which modules a stage keeps; a base forward that does work between them (learned position
embeddings added after `embed_tokens`, a scale, a projection) runs on every stage, so a later stage would apply it
again to hidden states: other tokens, no error. The probe finds that before any worker starts.
"""
from __future__ import annotations

import copy
import logging
import torch
from torch import nn

from hfbridge.model.compatibility import PROBE_PROMPTS, shrink_config
from hfbridge.parallel.pp_plan import FIX, PPPlanError, split_stages
from hfbridge.parallel.state import PPGroup

logger = logging.getLogger(__name__)
TOLERANCE = 1e-4  # float32, the same modules run in the same order: equal up to summation noise


def check_pp_split(cls: type, config, num_stages: int) -> None:
    """PPPlanError when running `cls` as `num_stages` stages changes its hidden states; a copy that cannot be built
    small is not probed (logged)."""
    for attention in ("eager", "sdpa"):  # remote code may reach eager only through ALL_ATTENTION_FUNCTIONS
        try:
            hidden, whole = _run_whole_and_staged(cls, config, num_stages, attention)
            break
        except Exception as exc:  # noqa: BLE001 - a best effort, like the attention probe
            error = exc
    else:
        logger.warning("pipeline split probe skipped for %s: its tiny copy did not run (%s)", cls.__name__, error)
        return
    difference = (hidden - whole).abs().max().item()
    if not difference <= TOLERANCE:  # NaN too
        raise PPPlanError(
            f"pipeline_parallel_size={num_stages} would change {cls.__name__}'s output (a tiny random copy run as "
            f"{num_stages} stages differs from it run whole by {difference:.3g}): its base model's forward does work "
            "outside the modules its base_model_pp_plan names (for example position embeddings added after "
            "`embed_tokens`), which every later stage would apply again. Name that work's module in the plan (the "
            f"stage holding the embedding must run it) with {FIX}, or use pipeline_parallel_size=1"
        )


def _run_whole_and_staged(cls: type, config, num_stages: int, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last stage's hidden states, the whole model's) for a prompt, on a tiny random float32 copy."""
    tiny = shrink_config(config, {"num_hidden_layers": max(2, num_stages)})
    torch.manual_seed(0)
    model = cls._from_config(tiny, attn_implementation=attention, dtype=torch.float32).eval()
    ids = torch.tensor([list(PROBE_PROMPTS[1])])
    positions = torch.arange(ids.shape[1])[None]
    num_layers = getattr(tiny.get_text_config(), "num_hidden_layers", None)
    with torch.no_grad():
        whole = model.base_model(input_ids=ids, position_ids=positions, use_cache=False)[0]
        hidden = None
        for stage in range(num_stages):
            staged = copy.deepcopy(model)
            # the stage as a worker holds it (a PPGroup needs no process group to be split by)
            split_stages(staged.base_model, _heads(staged), num_layers, PPGroup(stage, num_stages), False)
            inputs = {"input_ids": ids} if hidden is None else {"input_ids": None, "inputs_embeds": hidden}
            hidden = staged.base_model(**inputs, position_ids=positions, use_cache=False)[0]
    return hidden, whole


def _heads(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The modules applied after the base model (an LM head); none when the class is the base model itself."""
    base = model.base_model
    if base is model:
        return []
    return [(model, name) for name, child in model.named_children() if child is not base]
