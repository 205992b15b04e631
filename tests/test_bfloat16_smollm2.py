"""The real SmolLM2-135M in bfloat16: our bfloat16 path (the native decoder's panel kernels on bfloat16 weights,
float32 sums) against Transformers' own bfloat16 generate(), on the same chat prompts and the same checkpoint
rounded to bfloat16. The two round at different points and sum in different orders, so a prompt may part where
two tokens' logits lie within bfloat16's rounding of each other. The agreement is measured and printed; a prompt
may part only at such a tie, judged by Transformers' float32 logits at that point (the exact model), and most
prompts must agree on all NEW_TOKENS tokens."""
import torch
import transformers
from greedy import hf_greedy
from test_gguf_serving import QUESTIONS

from hfbridge import LLM, SamplingParams

NEW_TOKENS = 16
# Two logits of the float32 model closer than this (relative) can swap order once the model runs in bfloat16
# (8 significant bits: one unit in the last place is 2^-8 of a value): about two units.
BF16_TIE = 2 ** -7


def test_bfloat16_greedy_agrees_with_transformers_bfloat16(smollm2_float32):
    folder = str(smollm2_float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    references = [hf_greedy(bf16, p, NEW_TOKENS)[0] for p in prompts]

    llm = LLM(model=folder, dtype="bfloat16", max_model_len=512)
    panels = llm.apply_model(lambda m: sorted({str(x.packed.dtype) for x in m.modules()
                                               if getattr(x, "packed", None) is not None}))[0]
    assert panels == ["torch.bfloat16"], panels  # the bfloat16 kernels ran, not a float32 fallback
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
    ours = [list(o.outputs[0].token_ids) for o in outs]

    exact = None
    equal = 0
    for prompt, mine, theirs in zip(prompts, ours, references):
        parted = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        if parted is None:
            assert len(mine) == len(theirs), (mine, theirs)
            equal += 1
            continue
        if exact is None:
            exact = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = exact(torch.tensor([prompt + theirs[:parted]])).logits[0, -1]
        a, b = logits[mine[parted]].item(), logits[theirs[parted]].item()
        assert abs(a - b) <= BF16_TIE * max(abs(a), abs(b)), (parted, mine, theirs, a, b)
    print(f"bfloat16 agreement with Transformers' bfloat16: {equal}/{len(prompts)} prompts equal for "
          f"{NEW_TOKENS} tokens")
    assert 2 * equal > len(prompts), equal
