"""Tiny random models built from Transformers' config classes, saved with a small BPE tokenizer trained here.

Nothing is downloaded: configs come from Transformers, the tokenizer is trained on a few sentences."""
from __future__ import annotations

import functools
import importlib
import shutil
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Hello, my name is Ada and I like to write small programs.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a little robot who loved to read books.",
    "A quick brown fox jumps over the lazy dog, again and again.",
    "Serving language models needs a paged key-value cache and a scheduler.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.",
] * 20

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=2,
    pad_token_id=0,
)


def _config(name: str, **overrides) -> transformers.PretrainedConfig:
    return getattr(transformers, name)(**{**COMMON, **overrides})


# architecture -> config factory; each exercises a different attention feature
CONFIGS = {
    "LlamaForCausalLM": lambda: _config("LlamaConfig"),
    # sliding window shorter than the test prompts
    "MistralForCausalLM": lambda: _config("MistralConfig", sliding_window=8),
    "Qwen2ForCausalLM": lambda: _config("Qwen2Config"),
    # logit softcap, attention softcap, alternating sliding/full layers
    "Gemma2ForCausalLM": lambda: _config(
        "Gemma2Config", sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=5.0, final_logit_softcapping=5.0, query_pre_attn_scalar=16,
    ),
    "GPT2LMHeadModel": lambda: transformers.GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    ),
    "Qwen3MoeForCausalLM": lambda: _config(
        "Qwen3MoeConfig", moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
    ),
}


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_model(model: torch.nn.Module, folder: Path, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer:
        build_tokenizer().save_pretrained(folder)
    return folder


def build_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = getattr(transformers, arch)(config).eval()
    # Random init leaves some weights tiny (norms at 1, biases at 0); spread them so features matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" not in name and "ln" not in name:
                param.normal_(0, 0.02)
    return model


def make_tiny_model(arch: str, folder: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    model = build_model(arch, seed)
    return model, save_model(model, folder)


def import_remote_code(folder: Path, module: str):
    """The remote-code module `module` of a model folder, imported as Transformers would see it: a package of its
    own (a copy of the folder beside it), so its relative imports resolve."""
    package = f"remote_{folder.parent.name}_{folder.name}"
    shutil.copytree(folder, folder.parent / package)
    sys.path.insert(0, str(folder.parent))
    try:
        return importlib.import_module(f"{package}.{module}")
    finally:
        sys.path.remove(str(folder.parent))
