"""A causal LM run as one pipeline stage: the transform that makes the wrapper's forward hand hidden states on.

After `split_stages` (hfbridge.parallel.pp_plan) left this rank only its layers, the wrapper's forward is replaced
(as a transform, so `type(model)` stays TransformersForCausalLM and no model code branches on the stage):
- every stage but the first receives the previous stage's hidden states [1, T, H] and passes them to the model as
  `inputs_embeds` (the plan's hand-off: the embedding's output is the layers' input);
- every stage but the last runs the base model alone (its final norm is a placeholder) and sends its output on;
- the last stage runs the whole causal LM (norm, head, softcap) and returns the logits [N, V].
All ranks run every forward together (T and N come from the same scheduler output on each), so the probe and the
profile step hand off like any step. A non-last rank returns zeros shaped like the logits (a broadcast view, no
memory), or under external_launcher the last stage's logits, broadcast, because there every rank samples."""
from __future__ import annotations

import types

import torch

from hfbridge.model.transformers_model import TransformersForCausalLM
from hfbridge.parallel.state import PPGroup


def install_stage_forward(model: TransformersForCausalLM, pp: PPGroup, dtype: torch.dtype) -> None:
    text_config = model.config.get_text_config()
    model._pp = pp
    model._pp_hidden = (int(text_config.hidden_size), dtype)
    model._pp_vocab_size = int(text_config.vocab_size)
    model.forward = types.MethodType(_stage_forward, model)


def _stage_forward(
    self: TransformersForCausalLM,
    input_ids: torch.Tensor,  # [1, T]
    positions: torch.Tensor,  # [1, T]
    logits_indices: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [N, V] float32
    pp: PPGroup = self._pp
    hidden_size, dtype = self._pp_hidden
    num_rows = 0 if logits_indices is None else logits_indices.shape[0]
    hidden = None
    if not pp.is_first:
        hidden = pp.recv_prev((1, input_ids.shape[1], hidden_size), dtype, input_ids.device)
    logits = None
    if pp.is_last:
        logits = TransformersForCausalLM.forward(self, input_ids, positions, logits_indices, inputs_embeds=hidden)
    else:
        positions = positions + self.position_offset if self.position_offset else positions
        inputs = {"input_ids": input_ids} if hidden is None else {"input_ids": None, "inputs_embeds": hidden}
        out = self.model.base_model(**inputs, position_ids=positions, use_cache=False)
        pp.send_next(out[0].to(dtype))  # [1, T, H]: the last hidden state of this stage's layers
    if pp.logits_to_every_rank:
        if logits is None:
            logits = torch.empty((num_rows, self._pp_vocab_size), dtype=torch.float32, device=input_ids.device)
        return pp.broadcast_from_last(logits)
    if logits is None:  # never read: only the last stage's logits go to the driver
        return torch.zeros((), dtype=torch.float32, device=input_ids.device).expand(num_rows, self._pp_vocab_size)
    return logits
