"""The wrapper around a model that Transformers built: hfbridge's view of a causal LM."""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from hfbridge.pooling.pooling_model import _PADDING_OFFSET_POSITIONS  # one list of RoBERTa-convention model types


class TransformersForCausalLM(nn.Module):
    """Holds a Transformers causal LM whose attention runs through the "vllm" entry.

    The model sees every request of a step packed into one sequence: `input_ids`/`positions` [1, T]; sequence
    boundaries live in the attention metadata, not in the model. `use_cache=False` because the KV cache is ours.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.model = hf_model
        # RoBERTa-family decoders (is_decoder=True) learn positions from padding_idx + 1 on, as their encoders do.
        text_config = hf_model.config.get_text_config()
        offset_types = _PADDING_OFFSET_POSITIONS
        self.position_offset = int(text_config.pad_token_id or 0) + 1 if text_config.model_type in offset_types else 0

    @property
    def config(self):
        return self.model.config

    def forward(
        self,
        input_ids: torch.Tensor,  # [1, T]
        positions: torch.Tensor,  # [1, T]
        logits_indices: torch.Tensor | None = None,  # [N] token indices whose next-token logits are needed
        inputs_embeds: torch.Tensor | None = None,  # [1, T, H] a pipeline stage's input, in place of input_ids
    ) -> torch.Tensor:  # [N, V] float32
        if logits_indices is None:
            logits_indices = input_ids.new_zeros(0)
        # The model's own head computes logits (with its final softcap / logit scaling) only at logits_indices.
        positions = positions + self.position_offset if self.position_offset else positions
        inputs = {"input_ids": input_ids}
        if inputs_embeds is not None:  # a later pipeline stage: the previous stage's hidden states
            inputs = {"input_ids": None, "inputs_embeds": inputs_embeds}
        out = self.model(**inputs, position_ids=positions, use_cache=False, logits_to_keep=logits_indices)
        logits = out.logits[0]
        if logits.shape[0] != logits_indices.shape[0]:
            # A head that ignores logits_to_keep (remote code) returns every token's row: keep the asked ones.
            if logits.shape[0] != input_ids.shape[1]:
                raise RuntimeError(
                    f"{type(self.model).__name__} returned {logits.shape[0]} logit rows for {input_ids.shape[1]} "
                    f"tokens and logits_to_keep of {logits_indices.shape[0]}; hfbridge cannot tell which rows are whose"
                )
            logits = logits[logits_indices]
        return logits.float()


class BaseModelWithLMHead(nn.Module):
    """A base model from remote code (`auto_map.AutoModel`) plus the LM head its checkpoint carries.

    The base model sits under its `base_model_prefix`, so checkpoint names saved from the model's
    `...ForCausalLM` (`model.layers.0...`, `lm_head.weight`) match ours unchanged.
    """

    def __init__(self, base_model: nn.Module, config):
        super().__init__()
        self.prefix = getattr(base_model, "base_model_prefix", "") or "model"
        setattr(self, self.prefix, base_model)
        self.config = config
        text_config = config.get_text_config()
        hidden = getattr(text_config, "hidden_size")
        self.lm_head = nn.Linear(hidden, text_config.vocab_size, bias=False, device="meta", dtype=base_model.dtype)

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.prefix)

    def tie_weights(self) -> None:
        if self.lm_head.weight.is_meta and getattr(self.config.get_text_config(), "tie_word_embeddings", True):
            self.lm_head.weight = self.base_model.get_input_embeddings().weight

    def forward(self, input_ids, position_ids, use_cache=False, logits_to_keep=None, **kwargs):
        hidden = self.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache, **kwargs)[0]
        if logits_to_keep is not None:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        # The head-side conventions Transformers' own causal LMs follow, when the config names them.
        text_config = self.config.get_text_config()
        if getattr(text_config, "logit_scale", None):
            logits = logits * text_config.logit_scale
        if getattr(text_config, "logits_scaling", None):
            logits = logits / text_config.logits_scaling
        if getattr(text_config, "final_logit_softcapping", None):
            cap = text_config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return CausalLMOutput(logits=logits)


class TransformersForMultimodalLM(TransformersForCausalLM):
    """A vision-language model from Transformers: the causal LM above, plus its own input embeddings and image
    encoder (`get_image_features`), which the runner uses to put each image's rows into the packed stream."""

    def rope_index(self):
        """The model's get_rope_index (M-RoPE families: Qwen2-VL), or None."""
        for module in (self.model, getattr(self.model, "model", None)):
            if module is not None and hasattr(module, "get_rope_index"):
                return module.get_rope_index
        return None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # [1, T] -> [1, T, H]
        return self.model.get_input_embeddings()(input_ids)

    def encode_image(self, pixel_inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # -> [N, H]
        """One image's processor outputs -> its embedding rows, in the order its placeholders take them."""
        accepted = _named_parameters(self.model.get_image_features)
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        kwargs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                  for k, v in pixel_inputs.items() if k in accepted}
        output = self.model.get_image_features(**kwargs)
        features = getattr(output, "pooler_output", output)
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        return features.reshape(-1, features.shape[-1])


def _named_parameters(fn) -> frozenset[str]:
    return frozenset(p.name for p in inspect.signature(fn).parameters.values()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
