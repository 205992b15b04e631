"""Engine hardening (issue 15): prompt logprobs under preemption, a failed step, min_tokens with ignore_eos,
bad_words, child request ids, large-n aborts and fair admission. Oracles: Transformers' forward / generate()
on the same tiny model, and vLLM's documented semantics."""
import asyncio

import pytest
import torch
from greedy import hf_greedy
from tiny_models import build_tokenizer

from hfbridge import LLM, SamplingParams
from hfbridge.engine.async_engine import AsyncLLMEngine
from hfbridge.engine.llm_engine import EngineStepError
from hfbridge.engine.output_processor import OutputProcessor
from hfbridge.sample.sampling_params import RequestOutputKind

EOS = 2  # <|im_end|> in tiny_models
LONG = "Once upon a time there was a little robot who loved to read books. A quick brown fox jumps over"


def ids(text: str) -> list[int]:
    return build_tokenizer()(text).input_ids


def final(engine) -> dict:
    """Run an LLMEngine until idle; the finished output of each request id."""
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


# -- 1. prompt logprobs after preemption --------------------------------------------------------------------
def test_prompt_logprobs_once_per_position_when_preempted_mid_prefill(tiny_llama):
    prompt = ids(LONG)[:30]
    other = ids("The capital of France is Paris. The capital of Italy is Rome. Numbers: 0 1 2")[:24]
    with torch.no_grad():
        ref = torch.log_softmax(tiny_llama[0](torch.tensor([prompt])).logits[0].float(), -1)
    # 14 blocks of 4: the decoder (24 + 28 tokens) grows into the blocks the scored prompt holds mid-prefill.
    llm = LLM(model=str(tiny_llama[1]), max_model_len=56, block_size=4, num_gpu_blocks_override=14,
              max_num_batched_tokens=8, max_num_seqs=4)
    engine = llm.llm_engine
    preempted_mid_prefill = []
    real_preempt = engine.scheduler._preempt

    def spy(request):  # observe (not change) the scheduler: was the victim still in its prompt?
        preempted_mid_prefill.append(0 < request.num_computed_tokens < request.num_prompt_tokens)
        real_preempt(request)

    engine.scheduler._preempt = spy
    decode = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    engine.add_request("decoder", {"prompt_token_ids": other}, decode)
    engine.add_request("scored", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    out = final(engine)["scored"]
    assert any(preempted_mid_prefill), "the test must preempt a request in the middle of its prompt"
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry, target, row = out.prompt_logprobs[position], prompt[position], ref[position - 1]
        assert entry[target].logprob == pytest.approx(row[target].item(), abs=1e-4), position
        assert entry[target].rank == int((row > row[target]).sum()) + 1
    assert engine.kv_cache_manager.num_free_blocks == 14


# -- 2. a failed step ---------------------------------------------------------------------------------------
class FailOnce:
    """Test hook around the executor: the next step raises, as an OOM or a model error would."""

    def __init__(self, executor):
        self.executor, self.real = executor, executor.execute
        self.armed = False
        executor.execute = self

    def __call__(self, scheduler_output):
        if self.armed:
            self.armed = False
            self.failed_ids = [s.request.request_id for s in scheduler_output.scheduled]
            raise RuntimeError("CUDA out of memory (injected by the test)")
        return self.real(scheduler_output)


def test_failed_step_aborts_only_its_requests_and_poisons_no_prefix(tiny_llama):
    prompt, bystander = ids(LONG)[:16], ids("The capital of France is")
    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4, num_gpu_blocks_override=32,
              max_num_batched_tokens=16)
    engine = llm.llm_engine
    hook = FailOnce(engine.executor)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("victim", {"prompt_token_ids": prompt}, greedy)
    engine.add_request("bystander", {"prompt_token_ids": bystander}, greedy)  # waits: the budget is spent
    hook.armed = True
    with pytest.raises(EngineStepError) as info:
        engine.step()
    assert hook.failed_ids == ["victim"] and info.value.request_ids == ["victim"]
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not engine.kv_cache_manager.pool.cached, "the failed step's blocks must leave the prefix cache"

    done = final(engine)  # the bystander was not in the failed step: it completes
    assert set(done) == {"bystander"}
    assert done["bystander"].outputs[0].token_ids == hf_greedy(tiny_llama[0], bystander, 6, ignore_eos=True)[0]
    engine.add_request("again", {"prompt_token_ids": prompt}, greedy)
    again = final(engine)["again"]
    assert again.num_cached_tokens == 0  # nothing from the failed step is reused
    assert again.outputs[0].token_ids == hf_greedy(tiny_llama[0], prompt, 6, ignore_eos=True)[0]
    engine.add_request("hit", {"prompt_token_ids": prompt}, greedy)
    hit = final(engine)["hit"]  # blocks written by a successful step are cached as before
    assert hit.num_cached_tokens == 12 and hit.outputs[0].token_ids == again.outputs[0].token_ids
    assert engine.kv_cache_manager.num_free_blocks == 32


def test_failed_step_ends_only_its_streams_in_the_async_engine(tiny_llama):
    prompt, bystander = ids(LONG)[:16], ids("The capital of France is")
    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4, max_num_batched_tokens=16)
    hook = FailOnce(llm.llm_engine.executor)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    greedy.output_kind = RequestOutputKind.DELTA

    async def run():
        engine = AsyncLLMEngine(llm.llm_engine)
        hook.armed = True  # the first step holds only "victim" (its prompt spends the token budget)
        engine.start()
        try:
            victim = await engine.add_request("victim", {"prompt_token_ids": prompt}, greedy)
            other = await engine.add_request("bystander", {"prompt_token_ids": bystander}, greedy)

            async def tokens(stream):
                return [t async for out in stream for t in out.outputs[0].token_ids]

            results = await asyncio.wait_for(asyncio.gather(tokens(victim), tokens(other), return_exceptions=True), 60)
            assert engine.is_running
            return results
        finally:
            await engine.shutdown()

    victim_result, bystander_tokens = asyncio.run(run())
    assert isinstance(victim_result, EngineStepError), victim_result
    assert bystander_tokens == hf_greedy(tiny_llama[0], bystander, 6, ignore_eos=True)[0]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4)


def hf_generate(model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Transformers' greedy generate() with its own logits processors (the oracle for masking rules)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, **kwargs,
        )
    return out[0, len(prompt):].tolist()


# -- 3. min_tokens with ignore_eos --------------------------------------------------------------------------
def test_min_tokens_masks_eos_even_with_ignore_eos(llm, tiny_llama):
    prompt = ids("Hello, my name is")
    # A +100 bias makes EOS the greedy choice at every step: only the min_tokens mask keeps it out.
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=3, ignore_eos=True, logit_bias={EOS: 100})
    tokens = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    # Oracle: Transformers with EOS suppressed for the first 3 tokens; then EOS wins and ignore_eos goes on.
    first = hf_generate(tiny_llama[0], prompt, 3, suppress_tokens=[EOS], eos_token_id=-1)
    assert tokens == first + [EOS] * 3
    unbounded = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logit_bias={EOS: 100})
    assert llm.generate({"prompt_token_ids": prompt}, unbounded, use_tqdm=False)[0].outputs[0].token_ids == [EOS] * 3


# -- 4. bad_words -------------------------------------------------------------------------------------------
def reference_bad_words(words: list[str], tokenizer) -> list[list[int]]:
    """vLLM's SamplingParams.update_from_tokenizer, from its definition: each word as is, and with a leading
    space when that gives a different first token and the same number of tokens."""
    out = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def test_bad_words_follow_vllm_and_match_transformers_bad_words_ids(llm, tiny_llama):
    tokenizer = llm.get_tokenizer()
    prompt = ids("The capital of France is")
    free = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    # Ban a two-token word the model says (its first token inside the output: "Hel" + "p"), then a one-token
    # word it says later (and its " re" variant, a different token).
    words = [tokenizer.decode(free[2:4]), tokenizer.decode([free[4]]).strip()]
    assert words == ["Help", "re"]
    banned = reference_bad_words(words, tokenizer)
    assert [len(b) for b in banned] == [2, 1, 1]  # " Help" is 3 tokens: not a variant under vLLM's rule
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, bad_words=words)
    ours = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    # Transformers' NoBadWordsLogitsProcessor applies the same rule (over prompt + output: the prompt does not
    # end with any banned prefix here, so the two agree).
    theirs = hf_generate(tiny_llama[0], prompt, 10, bad_words_ids=banned, eos_token_id=-1)
    assert ours == theirs and ours != free
    with pytest.raises(ValueError, match="bad_words cannot contain an empty string"):
        SamplingParams(bad_words=["ok", ""])


# -- 6. child ids, NaN bias ---------------------------------------------------------------------------------
def test_child_ids_never_collide_with_user_ids(llm):
    engine = llm.llm_engine
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=5, ignore_eos=True, n=2)
    single = SamplingParams(temperature=1.0, seed=11, max_tokens=5, ignore_eos=True)
    prompt = {"prompt_token_ids": ids("A quick brown fox")}
    alone = {}
    for request_id, params in [("a", sampled), ("0_a", single)]:
        engine.add_request(request_id, prompt, params)
        alone[request_id] = [c.token_ids for c in final(engine)[request_id].outputs]
    for order in (["a", "0_a"], ["0_a", "a"]):
        for request_id in order:
            engine.add_request(request_id, prompt, sampled if request_id == "a" else single)
        together = {k: [c.token_ids for c in v.outputs] for k, v in final(engine).items()}
        assert together == alone
    # Aborting the user's "0_a" leaves sample 0 of "a" running.
    engine.add_request("a", prompt, sampled)
    engine.add_request("0_a", prompt, single)
    engine.step()
    engine.abort_request("0_a")
    assert [c.token_ids for c in final(engine)["a"].outputs] == alone["a"]


def test_nan_or_infinite_logit_bias_is_a_validation_error():
    from hfbridge.errors import ValidationError

    for bad in (float("nan"), float("inf"), float("-inf"), "nan"):
        with pytest.raises(ValidationError, match="logit_bias values must be finite numbers"):
            SamplingParams(logit_bias={5: bad})
    assert SamplingParams(logit_bias={5: 1e9}).logit_bias == {5: 100.0}  # finite values are clamped, as before


# -- 15. large n: bounded, linear abort, fair admission -----------------------------------------------------
def test_n_is_bounded_like_vllm():
    from hfbridge.errors import ValidationError

    with pytest.raises(ValidationError, match="n must be at most 16384, got 16385"):
        SamplingParams(n=16385, temperature=1.0)


def test_aborting_a_large_n_request_builds_one_output(llm, monkeypatch):
    engine = llm.llm_engine
    n = 2000
    params = SamplingParams(temperature=1.0, n=n, max_tokens=4, ignore_eos=True)
    engine.add_request("big", {"prompt_token_ids": ids("Hello")}, params)
    engine.step()
    calls = []
    real = OutputProcessor._make_output
    monkeypatch.setattr(OutputProcessor, "_make_output", lambda self, pid: calls.append(pid) or real(self, pid))
    outputs = engine.abort_request("big")
    assert calls == ["big"]  # once per parent, not once per sample (which was quadratic)
    assert len(outputs) == 1 and len(outputs[0].outputs) == n and outputs[0].finished
    assert all(c.finish_reason == "abort" for c in outputs[0].outputs)
    assert not engine.has_unfinished_requests() and not engine.output_processor.parents
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.pool.num_blocks


def test_a_large_n_request_does_not_starve_the_next_one(tiny_llama):
    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4, max_num_seqs=4)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": ids("Hello")}
    engine.add_request("big", prompt, SamplingParams(temperature=1.0, n=64, max_tokens=8, ignore_eos=True))
    engine.add_request("small", prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    scheduled = [s.request.group_id for s in engine.scheduler.schedule().scheduled]
    # Round-robin across requests: "small" takes the second free sequence slot, not the 65th.
    assert scheduled == ["big", "small", "big", "big"]


# -- 16. integers past int64, 18. verify before normalising -------------------------------------------------
INT64_OVER = 2**63


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(top_k=INT64_OVER), "top_k"),
        (dict(seed=INT64_OVER), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(max_tokens=INT64_OVER), "max_tokens"),
        (dict(min_tokens=INT64_OVER, max_tokens=None), "min_tokens"),
        (dict(logprobs=INT64_OVER), "logprobs"),
        (dict(prompt_logprobs=INT64_OVER), "prompt_logprobs"),
        (dict(truncate_prompt_tokens=INT64_OVER), "truncate_prompt_tokens"),
        (dict(n=INT64_OVER), "n"),
        (dict(stop_token_ids=[1, INT64_OVER]), "stop_token_ids"),
        (dict(allowed_token_ids=[INT64_OVER]), "allowed_token_ids"),
        (dict(logit_bias={INT64_OVER: 1.0}), "logit_bias"),
        (dict(logit_bias={str(INT64_OVER): 1.0}), "logit_bias"),
    ],
)
def test_integers_past_int64_are_validation_errors(kwargs, parameter):
    from hfbridge.errors import ValidationError

    with pytest.raises(ValidationError) as info:
        SamplingParams(**kwargs)
    assert info.value.parameter == parameter


def test_pooling_integers_past_int64_are_validation_errors():
    from hfbridge.errors import ValidationError
    from hfbridge.pooling.pooling_params import PoolingParams

    cases = [
        (dict(dimensions=INT64_OVER), "dimensions"), (dict(step_tag_id=-INT64_OVER - 1), "step_tag_id"),
        (dict(truncate_prompt_tokens=INT64_OVER), "truncate_prompt_tokens"),
        (dict(returned_token_ids=[0, INT64_OVER]), "returned_token_ids"),
    ]
    for kwargs, parameter in cases:
        with pytest.raises(ValidationError) as info:
            PoolingParams(**kwargs)
        assert info.value.parameter == parameter


def test_int64_bounds_are_accepted_and_reach_a_step(llm):
    # The largest values vLLM accepts run without overflowing inside the step (torch tensors are int64).
    params = SamplingParams(temperature=1.0, top_k=2**63 - 1, seed=2**63 - 1, max_tokens=2, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": ids("Hello")}, params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0, top_p=2), "top_p must be in (0, 1], got 2."),
        (dict(temperature=0, top_p=0), "top_p must be in (0, 1], got 0."),
        (dict(temperature=0, top_k=-5), "top_k must be 0 (disable), or at least 1, got -5."),
        (dict(temperature=0, min_p=1.5), "min_p must be in [0, 1], got 1.5."),
        (dict(temperature=0, top_k=2**63), "top_k must be within the int64 range"),
    ],
)
def test_ranges_are_checked_before_greedy_normalisation(kwargs, message):
    from hfbridge.errors import ValidationError

    with pytest.raises(ValidationError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


# -- 4. accepted-but-ignored arguments of LLM are applied or refused ----------------------------------------
def test_priority_needs_priority_scheduling_like_vllm(llm):
    prompt = {"prompt_token_ids": ids("Hello")}
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(ValueError, match="Got priority 3 but Priority scheduling is not enabled."):
        llm.generate([prompt], params, priority=[3], use_tqdm=False)
    with pytest.raises(ValueError, match="The lengths of prompts and priority must be the same."):
        llm.generate([prompt, prompt], params, priority=[0], use_tqdm=False)
    assert len(llm.generate([prompt], params, priority=[0], use_tqdm=False)) == 1  # vLLM's default priority
    assert not llm.llm_engine.has_unfinished_requests()


def test_priority_scheduling_serves_urgent_requests_first_with_transformers_tokens(tiny_llama):
    """scheduling_policy="priority" with one sequence slot: requests finish in (priority, arrival) order, and each
    one's tokens are Transformers' greedy tokens."""
    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, max_num_seqs=1, scheduling_policy="priority")
    prompts = [ids(text) for text in ("Hello there", "The capital of France", "Once upon a time")]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    finished_order = []
    real_finish = llm.llm_engine.scheduler.finish_requests

    def spy(request_ids, status):  # observe (not change) the order in which requests finish
        finished_order.extend(request_ids)
        real_finish(request_ids, status)

    llm.llm_engine.scheduler.finish_requests = spy
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, priority=[5, -1, 0], use_tqdm=False)
    assert [o.request_id for o in outputs] == sorted(finished_order, key=int)  # the outputs keep input order
    assert finished_order == [outputs[1].request_id, outputs[2].request_id, outputs[0].request_id]
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(tiny_llama[0], prompt, 6, ignore_eos=True)[0]


def test_cache_salt_isolates_the_prefix_cache(tiny_llama):
    """vLLM's cache_salt: the same prompt under another salt computes its K/V again (no timing side channel
    across tenants); under the same salt it hits. Tokens are Transformers' either way."""
    llm = LLM(model=str(tiny_llama[1]), max_model_len=64, block_size=4)
    prompt = ids(LONG)[:21]
    expected = hf_greedy(tiny_llama[0], prompt, 4, ignore_eos=True)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def run(salt):
        request = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        (out,) = llm.generate([request], params, use_tqdm=False)
        assert out.outputs[0].token_ids == expected
        return out.num_cached_tokens

    assert run("tenant-a") == 0
    assert run("tenant-b") == 0
    assert run(None) == 0
    assert run("tenant-a") == 20 and run(None) == 20
    for bad, message in (("", "non-empty"), ("a" * 129, "at most 128"), ("a/b", "must not contain")):
        with pytest.raises(ValueError, match=message):
            llm.generate([{"prompt_token_ids": prompt, "cache_salt": bad}], params, use_tqdm=False)


def test_prompt_keys_hfbridge_cannot_serve_are_refused(tiny_llama, llm):
    """An image must never be dropped silently: a text-only model refuses multimodal keys."""
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(ValueError, match="takes no multi_modal_data"):
        llm.generate([{"prompt": "Describe", "multi_modal_data": {"image": object()}}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="Unknown prompt key 'promt'"):
        llm.generate([{"prompt": "Hi", "promt": "typo"}], params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,message", [
    (dict(quantization="awq"), "quantization='awq' is not supported"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype='fp8' is not supported"),
    (dict(enable_lora=True, task="embed"), "enable_lora=True is not supported with pooling models"),
    (dict(enable_lora=True, max_loras=2, max_cpu_loras=1), r"max_cpu_loras \(1\) must be >= max_loras \(2\)"),
    (dict(limit_mm_per_prompt={"video": 1}), "video inputs are not supported"),
    (dict(mm_processor_kwargs={"num_crops": 4}), "processor options are not supported"),
    (dict(scheduling_policy="lottery"), "scheduling_policy='lottery'"),
])
def test_engine_arguments_that_change_outputs_are_refused(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=str(tiny_llama[1]), max_model_len=64, **kwargs)


def test_chat_template_content_format(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello\nthere"}]
    params = SamplingParams(temperature=0, max_tokens=3)
    # The tiny model's ChatML template prints content as a string: "auto" and "string" join the parts with
    # newlines (vLLM's "string" format), exactly as the plain-string message renders.
    expected = llm.chat(plain, params, use_tqdm=False)[0].prompt
    assert expected == "<|im_start|>user\nHello\nthere<|im_end|>\n<|im_start|>assistant\n"
    for fmt in ("auto", "string"):
        assert llm.chat(parts, params, use_tqdm=False, chat_template_content_format=fmt)[0].prompt == expected
    # A template that loops over content parts gets OpenAI's list form, from either message shape.
    loop = ("{% for m in messages %}{{ m['role'] }}:{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}\n"
            "{% endfor %}")
    single = [{"role": "user", "content": "Hello"}]
    for messages, rendered in ((parts, "user:[Hello][there]"), (single, "user:[Hello]")):
        for fmt in ("auto", "openai"):
            out = llm.chat(messages, params, use_tqdm=False, chat_template=loop, chat_template_content_format=fmt)
            assert out[0].prompt == rendered
    with pytest.raises(ValueError, match=r"chat_template_content_format must be one of \['auto', 'string', 'openai'\]"):
        llm.chat(plain, params, use_tqdm=False, chat_template_content_format="xml")


def test_lora_request_on_pooling_calls_is_refused(tiny_llama):
    embedder = LLM(model=str(tiny_llama[1]), task="embed", max_model_len=64)
    lora = object()  # any adapter: pooling models serve none
    calls = [
        lambda: embedder.embed(["Hello"], lora_request=lora, use_tqdm=False),
        lambda: embedder.encode(["Hello"], lora_request=lora, use_tqdm=False),
        lambda: embedder.reward(["Hello"], lora_request=lora, use_tqdm=False),
        lambda: embedder.score("Hello", "there", lora_request=lora, use_tqdm=False),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="LoRA adapters are served by generation models"):
            call()
    assert not embedder.llm_engine.has_unfinished_requests()
    assert len(embedder.embed(["Hello"], use_tqdm=False)[0].outputs.embedding) == 64


def test_waiting_queue_is_fcfs_per_request_round_robin_across_requests_and_preempted_first():
    from hfbridge.core.request import Request
    from hfbridge.core.waiting_queue import WaitingQueue

    def req(request_id, group):
        return Request(request_id, [1, 2], SamplingParams(), group_id=group)

    queue = WaitingQueue()
    singles = [req(str(i), str(i)) for i in range(3)]
    for r in singles:
        queue.append(r)
    assert [queue.pop() for _ in range(3)] == singles  # one request per group: first come, first served
    big = [req(f"{i}_big", "big") for i in range(3)]
    for r in big + singles[:2]:
        queue.append(r)
    preempted = req("p", "p")
    queue.appendleft(preempted)  # vLLM puts a preempted request back at the front
    queue.remove_many([big[1]])
    order = [queue.pop().request_id for _ in range(len(queue))]
    assert order == ["p", "0_big", "0", "1", "2_big"]
