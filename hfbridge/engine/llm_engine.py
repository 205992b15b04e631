"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time (the server drives it too)."""
from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from hfbridge.config import EngineConfig
from hfbridge.engine.engine_args import EngineArgs
from hfbridge.worker.executor import Executor
from hfbridge.worker.executor_registry import build_executor
from hfbridge.engine.input_processor import process_prompt
from hfbridge.core.kv_cache_manager import KVCacheManager
from hfbridge.engine.output_processor import OutputProcessor
from hfbridge.errors import ValidationError
from hfbridge.lora.request import LoRARequest
from hfbridge.multimodal.processor import MultiModalProcessor
from hfbridge.outputs import RequestOutput
from hfbridge.pooling.pooling_params import PoolingParams
from hfbridge.core.request import Request, RequestStatus
from hfbridge.sample.sampling_params import SamplingParams
from hfbridge.core.scheduler import Scheduler
from hfbridge.engine.tokenizer import eos_token_ids, load_tokenizer
from hfbridge.sample.bad_words import tokenize_bad_words
from hfbridge.sample.token_tables import tables_of
from hfbridge.structured_output.manager import StructuredOutputManager
from hfbridge.structured_output.reasoning import ReasoningEnd

logger = logging.getLogger(__name__)


# vLLM's buckets for vllm:iteration_tokens_total (tokens scheduled in one step)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class EngineStats:
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_finished: int = 0
    # tokens per step, as a histogram: counts per ITERATION_TOKEN_BUCKETS bound (not cumulative; the last is +Inf)
    iteration_tokens: list[int] = field(default_factory=lambda: [0] * (len(ITERATION_TOKEN_BUCKETS) + 1))
    iteration_tokens_sum: int = 0

    def observe_step(self, num_tokens: int) -> None:
        self.iteration_tokens[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, num_tokens)] += 1
        self.iteration_tokens_sum += num_tokens


class EngineStepError(RuntimeError):
    """A model step failed. Only the requests in that step were aborted (listed by the ids they were added
    with); the engine goes on serving the others. The cause is chained (`__cause__`)."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(
            f"the model step failed ({type(cause).__name__}: {cause}); aborted {len(request_ids)} request(s)"
        )
        self.request_ids = request_ids


class ExecutorDeadError(RuntimeError):
    """The executor lost a worker (a rank died or failed and the others were stopped): no step can run again.
    Fatal for the engine, unlike EngineStepError; the cause is chained."""


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        self.config = config
        self.model_config = config.model_config
        self.tokenizer = load_tokenizer(self.model_config)
        self.mm_processor = None  # a vision-language model's processor: prompts with images
        if config.multimodal_config is not None:
            self.mm_processor = MultiModalProcessor(self.model_config, config.multimodal_config,
                                                    config.attention_backend)
            if self.tokenizer is not None and not getattr(self.tokenizer, "chat_template", None):
                self.tokenizer.chat_template = self.mm_processor.chat_template  # where VLMs keep it
        self.executor = executor or build_executor(config)
        parallel = config.parallel_config
        if parallel.world_size > 1:
            logger.info(
                "Tensor parallel: world size %d (tp=%d, %s)", parallel.world_size, parallel.tensor_parallel_size,
                parallel.distributed_executor_backend,
            )
        self.kv_cache_manager = KVCacheManager(
            self.executor.num_blocks, config.cache_config.block_size, config.cache_config.enable_prefix_caching
        )
        lora_config = config.lora_config
        mm_config = config.multimodal_config
        self.scheduler = Scheduler(config.scheduler_config, self.kv_cache_manager,
                                   lora_config.max_loras if lora_config is not None else 0,
                                   mm_config.max_num_encoder_input_tokens if mm_config is not None else 0)
        self.lora_requests: dict[int, LoRARequest] = {}  # the adapters added (id -> request), loaded on every rank
        self.output_processor = OutputProcessor(self.tokenizer, config.scheduler_config.max_model_len)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_config)
        self.vocab_size = int(self.model_config.hf_text_config.vocab_size)
        self.structured_outputs = StructuredOutputManager(
            self.tokenizer, self.vocab_size, self.eos_token_ids, config.scheduler_config.max_num_seqs,
            reasoning=ReasoningEnd.for_parser(self.model_config.reasoning_parser, self.tokenizer),
        )
        self._request_errors: dict[str, Exception] = {}  # user id -> why it failed; see take_request_errors
        self.stats = EngineStats()
        self.is_shut_down = False  # shutdown() freed the KV cache: no more work

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.model_config.default_sampling)

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        """generate, or the pooling tasks of the model (embed / classify and their token-level forms)."""
        if self.model_config.runner == "generate":
            return ("generate",)
        if self.model_config.convert == "classify":
            return ("classify", "token_classify")
        return ("embed", "token_embed")

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams | PoolingParams,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """priority: lower runs first under scheduling_policy="priority"; non-zero is refused under fcfs.
        lora_request: the adapter to generate under (enable_lora), loaded here on first use."""
        self._refuse_if_shut_down()
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._check_priority(priority)
        if isinstance(params, PoolingParams):
            if lora_request is not None:
                raise ValueError("LoRA adapters are served by generation models; pooling requests take none")
            self._add_pooling_request(request_id, prompt, params, arrival_time, add_special_tokens, priority)
            return
        if lora_request is not None:
            self.add_lora(lora_request)
        if "generate" not in self.supported_tasks:
            raise ValidationError(
                "This model is served as a pooling model and cannot generate text. Try passing "
                "`--runner generate` to use the model as a generative model.", parameter="model",
            )
        params.verify_for_vocab(self.vocab_size, self.model_config.max_logprobs)
        if params.structured_outputs is not None:
            self.structured_outputs.validate(params.structured_outputs)  # cached when the server checked it first
        params = params.clone()  # one copy per request: the caller may reuse or change its own
        params.eos_token_ids, params.token_tables = self.eos_token_ids, None
        if params.bad_words and params.bad_words_token_ids is None:  # the server tokenized them on its own thread
            params.bad_words_token_ids = self._bad_words_token_ids(params)
        tables_of(params, self.vocab_size)  # built once, before the samples copy params: they share it
        processed = process_prompt(
            prompt, self.tokenizer, self.vocab_size, self.config.scheduler_config.max_model_len,
            params.truncate_prompt_tokens, add_special_tokens, self.mm_processor,
        )
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        for index in range(params.n):
            child_params = params if params.n == 1 else params.for_sample(index)
            if index > 0:  # sample 0 computes the request's prompt logprobs; its siblings may hit the prefix cache
                child_params.prompt_logprobs = None
            child_id = self._engine_id(request_id if params.n == 1 else f"{index}_{request_id}")
            generator = None
            if child_params.seed is not None:
                generator = torch.Generator(self.config.device).manual_seed(child_params.seed)
            request = Request(
                child_id, processed.prompt_token_ids, child_params, arrival_time, generator, group_id=request_id,
                priority=priority, cache_salt=processed.cache_salt, lora_request=lora_request,
                mm_inputs=processed.mm_inputs,
            )
            self.output_processor.add_request(request, request_id, index, params.n, processed.prompt)
            # A constrained request reaches the scheduler once its grammar is compiled (at once when cached).
            if child_params.structured_outputs is None or self.structured_outputs.add(request):
                self.scheduler.add_request(request)
        self.stats.num_prompt_tokens += len(processed.prompt_token_ids)

    # -- LoRA adapters (vLLM's LLMEngine names) ----------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and check an adapter on every rank; False if it was added already. Raises ValueError naming the
        adapter and the problem (a missing folder, a rank above max_lora_rank, another base model's shapes...)."""
        if self.config.lora_config is None:
            raise ValueError(f"LoRA adapter {getattr(lora_request, 'lora_name', lora_request)!r} was asked for, but "
                             "LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)")
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a hfbridge.lora.request.LoRARequest, got "
                             f"{type(lora_request).__name__}")
        known = self.lora_requests.get(lora_request.lora_int_id)
        if known == lora_request:
            return False
        if known is not None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r}: lora_int_id {lora_request.lora_int_id} is "
                             f"already the id of adapter {known.lora_name!r} ({known.lora_path}); give each adapter "
                             "its own id")
        self.executor.add_lora(lora_request)
        self.lora_requests[lora_request.lora_int_id] = lora_request
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter (requests still running under it keep it: they carry their LoRARequest)."""
        if self.lora_requests.pop(lora_int_id, None) is None:
            return False
        self.executor.remove_lora(lora_int_id)
        return True

    def list_loras(self) -> set[int]:
        return set(self.lora_requests)

    def _check_priority(self, priority: int) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValidationError(f"priority must be an integer, got {priority!r}", parameter="priority")
        if priority != 0 and self.config.scheduler_config.policy != "priority":
            raise ValidationError(
                f"Got priority {priority} but Priority scheduling is not enabled. Start the engine with "
                "scheduling_policy='priority' (--scheduling-policy priority).", parameter="priority", value=priority,
            )

    def _add_pooling_request(self, request_id, prompt, params: PoolingParams, arrival_time, add_special_tokens,
                             priority: int = 0) -> None:
        task = params.task or self.supported_tasks[0]
        if task not in self.supported_tasks:
            kind = "Embedding" if "embed" in task else "Classification"
            fix = "--convert embed" if "embed" in task else "--convert classify"
            if self.model_config.runner == "generate":
                raise ValidationError(
                    f"{kind} API is only supported for pooling models. Try passing `--runner pooling` "
                    "to use the model as a pooling model.", parameter="model",
                )
            raise ValidationError(
                f"{kind} API is not supported by this model. Try converting the model using `{fix}`.",
                parameter="task", value=task,
            )
        text_config = self.model_config.hf_text_config
        matryoshka = bool(getattr(text_config, "is_matryoshka", False) or getattr(text_config, "matryoshka_dimensions", None))
        params = params.resolve(
            task, self.model_config.served_model_name, int(text_config.hidden_size), matryoshka,
            self.model_config.pooler_config,
        )
        processed = process_prompt(
            prompt, self.tokenizer, self.vocab_size, self.config.scheduler_config.max_model_len,
            params.truncate_prompt_tokens, add_special_tokens,
        )
        request = Request(
            self._engine_id(request_id), processed.prompt_token_ids, None, arrival_time, pooling_params=params,
            token_type_ids=processed.token_type_ids, group_id=request_id, priority=priority,
        )
        self.output_processor.add_pooling_request(request, request_id, processed.prompt)
        self.scheduler.add_request(request)
        self.stats.num_prompt_tokens += request.num_prompt_tokens

    def _engine_id(self, candidate: str) -> str:
        """The engine's id for a request: the user's id (or vLLM's f"{index}_{id}" for the samples of n > 1),
        made unique with a suffix when taken. User ids and engine ids live in separate maps (the output
        processor keeps both), so a user id "0_a" never reaches sample 0 of request "a"."""
        request_id, suffix = candidate, 0
        while self.output_processor.is_engine_id_used(request_id):
            suffix += 1
            request_id = f"{candidate}#{suffix}"
        return request_id

    def _bad_words_token_ids(self, params: SamplingParams) -> list[list[int]] | None:
        if not params.bad_words:
            return None
        if self.tokenizer is None:
            raise ValidationError("bad_words needs a tokenizer (skip_tokenizer_init=False)", parameter="bad_words")
        return tokenize_bad_words(params.bad_words, self.tokenizer, self.vocab_size)

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Abort requests (by the id they were added with); their KV blocks are freed at once. Linear in the
        number of samples: a request with a large n is aborted in one pass."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        engine_ids = [e for request_id in ids for e in self.output_processor.engine_ids(request_id)]
        self.scheduler.finish_requests(engine_ids, RequestStatus.FINISHED_ABORTED)
        self.structured_outputs.remove(engine_ids)
        return self.output_processor.abort(engine_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.structured_outputs.num_waiting > 0

    def has_ready_work(self) -> bool:
        """Whether step() has something to do now: requests to schedule, or grammars that finished compiling.
        False while the only requests wait for their grammars (a driving loop may sleep until woken)."""
        return self.scheduler.has_unfinished_requests() or self.structured_outputs.has_settled()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_running + self.scheduler.num_waiting + self.structured_outputs.num_waiting

    def take_request_errors(self) -> dict[str, Exception]:
        """Requests that failed on their own since the last call (user id -> error): their grammar did not compile,
        or no token was left to sample. They are aborted already; the caller reports the errors."""
        errors, self._request_errors = self._request_errors, {}
        return errors

    def step(self) -> list[RequestOutput]:
        self._refuse_if_shut_down()
        if not self._admit_compiled() and not self.scheduler.has_unfinished_requests():
            self.structured_outputs.wait(timeout=0.1)  # nothing to run but compiles: sleep until one ends
            self._admit_compiled()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        self.stats.observe_step(scheduler_output.num_scheduled_tokens)
        bitmask = self.structured_outputs.bitmask(scheduler_output.scheduled)
        if bitmask is not None:
            scheduler_output = dataclasses.replace(scheduler_output, grammar_bitmask=bitmask)
        try:
            runner_output = self.executor.execute(scheduler_output)
        except Exception as e:
            failed = self._fail_step(scheduler_output)
            try:
                self.check_health()  # a multi-process executor stops every worker when one fails
            except Exception as dead:  # noqa: BLE001 - whatever the executor says killed it
                raise ExecutorDeadError(f"{dead} (the step failed with {type(e).__name__}: {e})") from e
            raise EngineStepError(failed, e) from e
        advanced = self.scheduler.update_from_output(scheduler_output, runner_output)
        grammar_ended, failed = self.structured_outputs.accept(advanced)
        failed.update({request_id: ValidationError(why, parameter=parameter)
                       for request_id, (parameter, why) in runner_output.failed.items()})
        outputs, finished = self.output_processor.process(advanced, runner_output, grammar_ended)
        by_status: dict[RequestStatus, list[str]] = {}
        for request_id, status in finished.items():
            by_status.setdefault(status, []).append(request_id)
        for status, request_ids in by_status.items():  # one pass over the running list per status, not per request
            self.scheduler.finish_requests(request_ids, status)
        self.structured_outputs.remove(finished)
        self._fail_requests(failed)
        self.stats.num_generation_tokens += len(advanced)
        self.stats.num_finished += len(finished)
        return outputs

    def _admit_compiled(self) -> bool:
        """Requests whose grammar compiled go to the scheduler, those whose compile failed fail; True if any did."""
        ready, failed = self.structured_outputs.take_settled()
        for request in ready:
            self.scheduler.add_request(request)
        self._fail_requests(failed)
        return bool(ready or failed)

    def _fail_requests(self, errors: dict[str, Exception]) -> None:
        """Abort the user requests of these engine requests (every sample) and keep their errors for the caller."""
        for request_id, error in errors.items():
            user_id = self.output_processor.user_id(request_id)
            if user_id is not None and user_id not in self._request_errors:
                self._request_errors[user_id] = error
                self.abort_request(user_id)

    def _fail_step(self, scheduler_output) -> list[str]:
        """After a failed step: forget the prefix-cache entries registered for blocks this step was to write
        (their K/V may never have been written), and abort the user requests the step held, all their samples
        included. Returns those user ids."""
        self.kv_cache_manager.drop_step_cached_blocks()
        user_ids = dict.fromkeys(
            user_id for item in scheduler_output.scheduled
            if (user_id := self.output_processor.user_id(item.request.request_id)) is not None
        )
        self.abort_request(list(user_ids))
        return list(user_ids)

    def apply_model(self, func) -> list[Any]:
        return self.executor.apply_model(func)

    def is_compiling(self) -> bool:
        """Whether a background torch.compile (enforce_eager=False) is still warming up in this process; steps
        run eagerly meanwhile."""
        compiles = getattr(self.executor, "background_compiles", None)
        return compiles is not None and any(not c.done.is_set() for c in compiles())

    def check_health(self) -> None:
        """Raises when the executor lost a worker (multi-process executors); a no-op in one process."""
        check = getattr(self.executor, "check_health", None)
        if check is not None:
            check()

    def shutdown(self) -> None:
        if not self.is_shut_down:
            self.is_shut_down = True
            self.structured_outputs.shutdown()
            self.executor.shutdown()

    def _refuse_if_shut_down(self) -> None:
        # Else a step would run the model without its KV cache and fail deep inside attention.
        if self.is_shut_down:
            raise RuntimeError("This engine was shut down (its KV cache is freed); create a new LLMEngine or LLM")
