"""A remote-code config whose model says a fixed script: `script` is a list of [position, token ids], the
greedy token after each position (so a test that knows its prompt's length knows the reply)."""
from transformers import PretrainedConfig


class ScriptedConfig(PretrainedConfig):
    model_type = "scripted_lm"

    def __init__(self, vocab_size=384, num_attention_heads=4, script=None, filler_token_id=2,
                 max_position_embeddings=1024, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = vocab_size  # the hidden state is a one-hot of the next token
        self.num_hidden_layers = 1
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.script = script or []
        self.filler_token_id = filler_token_id  # said wherever the script is silent (EOS)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
