"""A custom model following the three rules of a Transformers-backend-compatible model:
(1) kwargs are passed down to attention, (2) attention goes through ALL_ATTENTION_FUNCTIONS,
(3) `_supports_attention_backend = True`. The customisation lives in the base model, `MyModel`."""
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_my import MyConfig


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MyRotary(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids):  # [B, T] -> cos, sin [B, 1, T, D]
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


class MyAttention(nn.Module):
    is_causal = True

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        kv_dim = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = attention_interface(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out.reshape(batch, length, -1))


class MyLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = MyAttention(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 128), nn.GELU(), nn.Linear(128, config.hidden_size))

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), position_embeddings, attention_mask, **kwargs)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class MyPreTrainedModel(PreTrainedModel):
    config_class = MyConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_attention_backend = True


class MyModel(MyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = MyRotary(config)
        self.layers = nn.ModuleList(MyLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, inputs_embeds=None, use_cache=None, **kwargs):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        mask = create_causal_mask(self.config, hidden_states, attention_mask, None, position_ids)
        position_embeddings = self.rotary(position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, position_ids=position_ids, **kwargs)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class MyForCausalLM(MyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = MyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, **kwargs):
        hidden_states = self.model(input_ids, position_ids, attention_mask, **kwargs).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden_states))
