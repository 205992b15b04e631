"""A custom remote-code model (auto_map.AutoModel, customisation in MyModel, checkpoint saved from its
MyForCausalLM) loads with trust_remote_code=True and matches Transformers greedily; it is refused without
the flag, and a model without `_supports_attention_backend` is refused naming that flag."""
import json
from pathlib import Path

import pytest
import torch
from tiny_models import build_tokenizer, import_remote_code

from hfbridge import LLM, SamplingParams

SOURCE = Path(__file__).parent / "custom_model"


def write_remote_code_model(folder: Path, supports_backend: bool = True,
                            edits: tuple[tuple[str, str], ...] = ()) -> torch.nn.Module:
    """Save MyForCausalLM's weights with the modeling files beside them, as a Hub repo would hold them. `edits`:
    (old, new) replacements in the modeling file, for variants."""
    folder.mkdir(parents=True)
    for name in ("configuration_my.py", "modeling_my.py"):
        text = (SOURCE / name).read_text()
        if not supports_backend:
            text = text.replace("_supports_attention_backend = True", "_supports_attention_backend = False")
        for old, new in edits if name == "modeling_my.py" else ():
            assert old in text, old
            text = text.replace(old, new)
        (folder / name).write_text(text)
    modeling = import_remote_code(folder, "modeling_my")
    torch.manual_seed(0)
    model = modeling.MyForCausalLM(modeling.MyConfig()).eval()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_my.MyConfig", "AutoModel": "modeling_my.MyModel"}
    config["architectures"] = ["MyForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    build_tokenizer().save_pretrained(folder)
    return model


def transformers_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation with the model's own forward (sdpa attention)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_remote_code_model_matches_transformers(tmp_path):
    model = write_remote_code_model(tmp_path / "my_model")
    assert model.config._attn_implementation == "sdpa"
    prompts = [[5, 6, 7], [100, 200, 300, 12, 13, 14, 15, 16, 17], list(range(30, 51))]
    expected = [transformers_greedy(model, p, 10) for p in prompts]

    llm = LLM(model=str(tmp_path / "my_model"), trust_remote_code=True, block_size=4, max_model_len=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.apply_model(lambda m: type(m.model.model).__name__) == ["MyModel"]


def test_remote_code_needs_trust_remote_code(tmp_path):
    write_remote_code_model(tmp_path / "untrusted")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        LLM(model=str(tmp_path / "untrusted"), max_model_len=64)


def test_model_without_the_flag_is_refused_by_name(tmp_path):
    write_remote_code_model(tmp_path / "no_flag", supports_backend=False)
    with pytest.raises(ValueError) as info:
        LLM(model=str(tmp_path / "no_flag"), trust_remote_code=True, max_model_len=64)
    message = str(info.value)
    assert "MyModel" in message and "_supports_attention_backend" in message
    assert "ALL_ATTENTION_FUNCTIONS" in message and "kwargs" in message


def test_attention_not_through_the_interface_names_the_users_class(tmp_path):
    folder = tmp_path / "direct_sdpa"
    write_remote_code_model(folder)
    modeling = (folder / "modeling_my.py").read_text()
    modeling = modeling.replace(
        "attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]",
        "attention_interface = ALL_ATTENTION_FUNCTIONS['sdpa']",
    )
    (folder / "modeling_my.py").write_text(modeling)
    with pytest.raises(ValueError, match=r"MyModel made no call to the 'vllm' attention function.*_attn_implementation"):
        LLM(model=str(folder), trust_remote_code=True, max_model_len=64)
