"""`LLM`: the offline API with vLLM's names."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from hfbridge.engine.chat_utils import format_conversation, load_chat_template, render_chat
from hfbridge.engine.engine_args import EngineArgs
from hfbridge.engine.input_processor import is_token_ids
from hfbridge.engine.llm_engine import LLMEngine
from hfbridge.lora.request import LoRARequest
from hfbridge.multimodal.chat import count_image_parts, split_images
from hfbridge.outputs import RequestOutput
from hfbridge.pooling.pooling_outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from hfbridge.pooling.pooling_params import PoolingParams
from hfbridge.sample.sampling_params import RequestOutputKind, SamplingParams
from hfbridge.pooling.scoring import plan_scoring


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
        """lora_request: a LoRARequest for every prompt, or a list of one per prompt (None: the base model)."""
        self._require_runner("generate", "generate")
        prompt_list = _as_prompt_list(prompts)
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError("The lengths of prompts and priority must be the same.")
        params_list = self._params_per_prompt(prompt_list, sampling_params)
        return self._run(prompt_list, params_list, use_tqdm, priority, _loras_per_prompt(lora_request, prompt_list))

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
        self._require_runner("chat", "generate")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        engine = self.llm_engine
        tokenizer = self.get_tokenizer()
        template = chat_template or engine.model_config.chat_template
        jinja = load_chat_template(template) or getattr(tokenizer, "chat_template", None)
        prompts = []
        for conversation in conversations:
            images = []
            if count_image_parts(conversation):
                conversation, images = split_images(conversation, engine.config.multimodal_config,
                                                    engine.model_config.model)
            conversation = format_conversation(conversation, chat_template_content_format, jinja)
            text = render_chat(
                tokenizer, conversation, chat_template=template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools, chat_template_kwargs=chat_template_kwargs,
            )
            # The template already holds BOS and friends: tokenize without adding special tokens again.
            if images:
                ids, mm_inputs = engine.mm_processor.process(text, None, {"image": images}, add_special_tokens=False)
                prompts.append({"prompt": text, "prompt_token_ids": ids, "multi_modal_data": mm_inputs})
                continue
            ids = tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    # -- pooling ---------------------------------------------------------------------------------------------
    def encode(
        self,
        prompts: Any,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        pooling_task: str | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[PoolingRequestOutput]:
        """Raw pooled outputs. pooling_task: embed, classify, token_embed or token_classify; left unset it is
        the model's token-level task, as vLLM 0.11's `encode` task was."""
        self._require_runner("encode", "pooling")
        _refuse_lora(lora_request)
        if pooling_task is None:
            pooling_task = "token_" + self.llm_engine.supported_tasks[0]
        prompt_list = _as_prompt_list(prompts)
        params = pooling_params if pooling_params is not None else PoolingParams()
        params_list = [params] * len(prompt_list) if isinstance(params, PoolingParams) else list(params)
        if len(params_list) != len(prompt_list):
            raise ValueError(f"The lengths of prompts ({len(prompt_list)}) and params ({len(params_list)}) must be the same.")
        truncate = truncate_prompt_tokens or (tokenization_kwargs or {}).get("truncate_prompt_tokens")
        bound = []
        for p in params_list:
            p = p.clone()
            p.task = pooling_task
            if truncate is not None:
                p.truncate_prompt_tokens = truncate
            bound.append(p)
        return self._run(prompt_list, bound, use_tqdm)

    def embed(self, prompts: Any, *, use_tqdm=True, pooling_params=None, lora_request=None,
              tokenization_kwargs=None, truncate_prompt_tokens=None) -> list[EmbeddingRequestOutput]:
        self._require_runner("embed", "pooling")
        outs = self.encode(prompts, pooling_params, use_tqdm=use_tqdm, pooling_task="embed",
                           lora_request=lora_request,
                           tokenization_kwargs=tokenization_kwargs, truncate_prompt_tokens=truncate_prompt_tokens)
        return [EmbeddingRequestOutput.from_base(o) for o in outs]

    def classify(self, prompts: Any, *, use_tqdm=True, pooling_params=None, lora_request=None,
                 tokenization_kwargs=None, truncate_prompt_tokens=None) -> list[ClassificationRequestOutput]:
        self._require_runner("classify", "pooling")
        outs = self.encode(prompts, pooling_params, use_tqdm=use_tqdm, pooling_task="classify",
                           lora_request=lora_request,
                           tokenization_kwargs=tokenization_kwargs, truncate_prompt_tokens=truncate_prompt_tokens)
        return [ClassificationRequestOutput.from_base(o) for o in outs]

    def reward(self, prompts: Any, /, *, truncate_prompt_tokens=None, use_tqdm=True, pooling_params=None,
               lora_request=None) -> list[PoolingRequestOutput]:
        """Token-level outputs of a reward model (vLLM 0.11's `encode` task)."""
        self._require_runner("reward", "pooling")
        return self.encode(prompts, pooling_params, use_tqdm=use_tqdm, truncate_prompt_tokens=truncate_prompt_tokens,
                           lora_request=lora_request)

    def score(self, data_1: Any, data_2: Any, /, *, use_tqdm=True, pooling_params=None, lora_request=None,
              tokenization_kwargs=None, chat_template=None, truncate_prompt_tokens=None) -> list[ScoringRequestOutput]:
        """Pairs 1:1, 1:N or N:N. Cross-encoders (one-label classifiers) score each pair; embedding models
        score by the cosine similarity of the two embeddings."""
        self._require_runner("score", "pooling")
        _refuse_lora(lora_request)
        engine = self.llm_engine
        plan = plan_scoring(data_1, data_2, engine.supported_tasks, engine.model_config.hf_config, self.get_tokenizer())
        outs = self.encode(plan.prompts, pooling_params, use_tqdm=use_tqdm, pooling_task=plan.task,
                           truncate_prompt_tokens=truncate_prompt_tokens)
        scores = plan.scores([o.outputs.data for o in outs])
        if plan.task == "classify":
            return [ScoringRequestOutput.from_base(o) for o in outs]
        return [
            ScoringRequestOutput(f"{outs[a].request_id}-{outs[b].request_id}", ScoringOutput(score),
                                 outs[a].prompt_token_ids + outs[b].prompt_token_ids)
            for (a, b), score in zip(plan.pairs, scores)
        ]

    def _require_runner(self, method: str, runner: str) -> None:
        if self.llm_engine.model_config.runner == runner:
            return
        if runner == "generate":
            raise ValueError(
                f"LLM.{method}() is only supported for generative models. Try passing `--runner generate` to use "
                "the model as a generative model."
            )
        raise ValueError(
            f"LLM.{method}() is only supported for pooling models. Try passing `--runner pooling` to use the "
            "model as a pooling model."
        )

    def _params_per_prompt(self, prompts: list[Any], sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"The lengths of prompts ({len(prompts)}) and params ({len(params)}) must be the same.")
        return params

    def _run(self, prompts: list[Any], params: list[SamplingParams | PoolingParams], use_tqdm,
             priorities: Sequence[int] | None = None, loras: Sequence[LoRARequest | None] | None = None) -> list[Any]:
        engine = self.llm_engine
        order = []
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            request_id = str(next(self._request_counter))
            if isinstance(p, SamplingParams):
                p = p.clone()
                p.output_kind = RequestOutputKind.FINAL_ONLY
            try:
                engine.add_request(request_id, prompt, p, priority=0 if priorities is None else priorities[index],
                                   lora_request=None if loras is None else loras[index])
            except BaseException:
                engine.abort_request(order)
                raise
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
                outputs = engine.step()
                errors = engine.take_request_errors()
                if errors:  # e.g. a grammar that did not compile: raised, as vLLM raises for an invalid schema
                    raise next(iter(errors.values()))
                for out in outputs:
                    if out.finished:
                        finished[out.request_id] = out
                        num_in += len(out.prompt_token_ids)
                        if isinstance(out, RequestOutput):
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


def _refuse_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise ValueError("LoRA adapters are served by generation models (LLM.generate / chat); pooling calls take "
                         "lora_request=None")


def _loras_per_prompt(lora_request: Any, prompts: list[Any]) -> list[LoRARequest | None] | None:
    if lora_request is None:
        return None
    if isinstance(lora_request, LoRARequest):
        return [lora_request] * len(prompts)
    if not isinstance(lora_request, (list, tuple)):
        raise ValueError(f"lora_request must be a LoRARequest or a list of one per prompt, got "
                         f"{type(lora_request).__name__}")
    if len(lora_request) != len(prompts):
        raise ValueError(f"The lengths of prompts ({len(prompts)}) and lora_request ({len(lora_request)}) must be "
                         "the same.")
    return list(lora_request)


def _as_prompt_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, (str, dict)) or is_token_ids(prompts):
        return [prompts]
    return list(prompts)
