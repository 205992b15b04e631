"""`LLM`: the offline API with vLLM's names."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from hfbridge.chat_utils import render_chat
from hfbridge.engine_args import EngineArgs
from hfbridge.input_processor import is_token_ids
from hfbridge.llm_engine import LLMEngine
from hfbridge.outputs import RequestOutput
from hfbridge.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Load a model through Transformers and generate with hfbridge's engine.

    >>> llm = LLM(model="path/or/hub-id", model_impl="transformers")
    >>> llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=32))
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.get_default_sampling_params()

    def apply_model(self, func: Callable[[Any], Any]) -> list[Any]:
        return self.llm_engine.apply_model(func)

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        priority: Any = None,
    ) -> list[RequestOutput]:
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported by hfbridge yet; pass lora_request=None")
        prompt_list = _as_prompt_list(prompts)
        params_list = self._params_per_prompt(prompt_list, sampling_params)
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = chat_template or self.llm_engine.model_config.chat_template
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = render_chat(
                tokenizer, conversation, chat_template=template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools, chat_template_kwargs=chat_template_kwargs,
            )
            # The template already holds BOS and friends: tokenize without adding special tokens again.
            ids = tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def _params_per_prompt(self, prompts: list[Any], sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"The lengths of prompts ({len(prompts)}) and params ({len(params)}) must be the same.")
        return params

    def _run(self, prompts: list[Any], params: list[SamplingParams], use_tqdm) -> list[RequestOutput]:
        engine = self.llm_engine
        order = []
        for prompt, p in zip(prompts, params):
            request_id = str(next(self._request_counter))
            final_only = p.clone()
            final_only.output_kind = RequestOutputKind.FINAL_ONLY
            engine.add_request(request_id, prompt, final_only)
            order.append(request_id)
        bar = None
        if use_tqdm and order:
            bar_cls = use_tqdm if callable(use_tqdm) else tqdm
            bar = bar_cls(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        finished: dict[str, RequestOutput] = {}
        num_in = num_out = 0
        start = time.perf_counter()
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        num_in += len(out.prompt_token_ids)
                        num_out += sum(len(c.token_ids) for c in out.outputs)
                        if bar is not None:
                            elapsed = time.perf_counter() - start
                            bar.set_postfix_str(
                                f"est. speed input: {num_in / elapsed:.2f} toks/s, output: {num_out / elapsed:.2f} toks/s"
                            )
                            bar.update(1)
        except BaseException:
            engine.abort_request([r for r in order if r not in finished])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in order]


def _as_prompt_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, (str, dict)) or is_token_ids(prompts):
        return [prompts]
    return list(prompts)
