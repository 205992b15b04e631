"""A model that follows the three rules (kwargs down to attention, attention through ALL_ATTENTION_FUNCTIONS,
`_supports_attention_backend`) and whose greedy output is its config's script: the attention runs on every call
(so the engine's paged cache is exercised) but the hidden state is the one-hot of the scripted next token, and the
LM head is the identity."""
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_scripted import ScriptedConfig


class ScriptedAttention(nn.Module):
    is_causal = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer_idx = 0
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        batch, length, _ = hidden_states.shape
        q, k, v = (t.view(batch, length, -1, self.head_dim).transpose(1, 2) for t in self.qkv(hidden_states).chunk(3, -1))
        attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = attention_interface(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return out.reshape(batch, length, -1)


class ScriptedPreTrainedModel(PreTrainedModel):
    config_class = ScriptedConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_attention_backend = True


class ScriptedModel(ScriptedPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn = ScriptedAttention(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, inputs_embeds=None, use_cache=None,
                **kwargs):
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        attended = self.attn(hidden, None, position_ids=position_ids, **kwargs)
        table = torch.full((self.config.max_position_embeddings,), self.config.filler_token_id, dtype=torch.long)
        for start, tokens in self.config.script:
            table[start : start + len(tokens)] = torch.tensor(tokens)
        next_tokens = table.to(hidden.device)[position_ids.clamp(max=len(table) - 1)]
        one_hot = nn.functional.one_hot(next_tokens, self.config.vocab_size).to(hidden.dtype)
        return BaseModelOutput(last_hidden_state=60.0 * one_hot + 0.0 * attended)  # p(other) < e^-54


class ScriptedForCausalLM(ScriptedPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = ScriptedModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, **kwargs):
        hidden_states = self.model(input_ids, position_ids, attention_mask, **kwargs).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden_states))
