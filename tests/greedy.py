"""The oracle for generation: Transformers' own greedy generate(), one prompt at a time (no padding)."""
from __future__ import annotations

import torch

# Two logits closer than this are a float-noise tie: either token is a correct greedy choice.
TIE_TOLERANCE = 1e-4


def hf_greedy(
    model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits at each step. ignore_eos: generate past EOS (an id no token has)."""
    extra = {"eos_token_id": -1} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
            **extra,
        )
    return out.sequences[0, len(prompt_ids):].tolist(), [s[0] for s in out.logits]


def assert_greedy_match(ours: list[int], theirs: list[int], their_logits: list[torch.Tensor]) -> None:
    """Equal token ids; the only allowed difference is a documented top-2 near tie, after which both
    continuations are valid and comparison stops."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        logits = their_logits[i].float()
        gap = (logits[b] - logits[a]).item()
        top2 = logits.topk(2).indices.tolist()
        assert a in top2 and gap < TIE_TOLERANCE, (
            f"token {i}: ours {a}, Transformers' {b} (logit gap {gap:.3g}, top-2 {top2})\nours   {ours}\ntheirs {theirs}"
        )
        return
    assert len(ours) == len(theirs), f"lengths differ:\nours   {ours}\ntheirs {theirs}"
