"""A remote-code model whose only class is a `...ForCausalLM` that ignores `logits_to_keep` (it returns a row for
every token): batched prompts of different lengths still get Transformers' own greedy tokens for every request."""
import json

from test_custom_model import transformers_greedy, write_remote_code_model

from hfbridge import LLM, SamplingParams


def test_for_causal_lm_ignoring_logits_to_keep_matches_every_request(tmp_path):
    folder = tmp_path / "causal_only"
    model = write_remote_code_model(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    prompts = [[5, 6, 7], [100, 200, 300, 12, 13, 14, 15, 16, 17], list(range(30, 51))]
    expected = [transformers_greedy(model, p, 8) for p in prompts]

    llm = LLM(model=str(folder), trust_remote_code=True, block_size=4, max_model_len=64, dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.apply_model(lambda m: type(m.model).__name__) == ["MyForCausalLM"]
