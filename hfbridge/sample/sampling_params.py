"""SamplingParams: vLLM's fields, defaults, normalisation and error messages."""
from __future__ import annotations

import copy
import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from hfbridge.errors import ValidationError
from hfbridge.sample.structured_outputs_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_GREEDY_EPS = 1e-5
_MIN_TEMPERATURE = 1e-2
MAX_N = 16384
LOGIT_BIAS_LIMIT = 100.0
# vLLM's per-request table caps (its GPU sampler's MAX_NUM_ALLOWED_TOKEN_IDS, MAX_NUM_LOGIT_BIAS_TOKENS,
# MAX_NUM_BAD_WORDS, MAX_BAD_WORDS_TOTAL_TOKENS), with its messages: each table is applied at every step.
MAX_NUM_ALLOWED_TOKEN_IDS = 1024
MAX_NUM_LOGIT_BIAS_TOKENS = 1024
MAX_NUM_BAD_WORDS = 128  # token sequences, after tokenisation (a word and its leading-space variant count twice)
MAX_BAD_WORDS_TOTAL_TOKENS = 1024


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT_FIELDS = ("n", "best_of", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
               "truncate_prompt_tokens")
_FLOAT_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")


def check_int64(name: str, number: Any, value: Any = None) -> None:
    """None passes (unset); anything else must be an int (not a bool) within int64: a larger one would
    overflow a torch tensor inside the engine step and fail every request in it."""
    if number is None:
        return
    if isinstance(number, bool) or not isinstance(number, int):
        raise ValidationError(
            f"{name} must be an integer, got {type(number).__name__}", parameter=name,
            value=number if value is None else value,
        )
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValidationError(
            f"{name} must be within the int64 range [{INT64_MIN}, {INT64_MAX}], got {number}.", parameter=name,
            value=number if value is None else value,
        )


def check_table_size(name: str, size: int, value: Any = None) -> None:
    """allowed_token_ids / logit_bias / bad_words hold at most vLLM's number of entries (checked before the entries)."""
    limits = {"allowed_token_ids": (MAX_NUM_ALLOWED_TOKEN_IDS, "Too many allowed token IDs: {}. The max size is {}."),
              "logit_bias": (MAX_NUM_LOGIT_BIAS_TOKENS, "Too many logit bias tokens: {}. The max size is {}."),
              "bad_words": (MAX_NUM_BAD_WORDS, "Too many bad words: {}. The max number is {}.")}
    limit, message = limits[name]
    if size > limit:
        raise ValidationError(message.format(size, limit), parameter=name, value=size if value is None else value)


def _normalize_logit_bias(logit_bias: dict[Any, Any]) -> dict[int, float]:
    """Keys -> int64 token ids; values -> finite floats clamped to [-100, 100]. NaN or inf is refused (a NaN
    bias would turn the row's logits to NaN; clamping it to +-100 would silently change the request)."""
    out: dict[int, float] = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError) as e:
            raise ValidationError(
                "logit_bias contains key(s) that cannot be converted to integer token IDs",
                parameter="logit_bias", value=logit_bias,
            ) from e
        check_int64("logit_bias", token_id, value=logit_bias)
        try:
            bias = float(bias)
        except (TypeError, ValueError):
            bias = math.nan
        if not math.isfinite(bias):
            raise ValidationError(
                f"logit_bias values must be finite numbers, got {bias!r} for token {token_id}",
                parameter="logit_bias", value=logit_bias,
            )
        out[token_id] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, bias))
    return out


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries everything so far
    DELTA = 1  # only what is new since the last output
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    extra_args: dict[str, Any] | None = None
    # Filled by the engine: EOS ids of the model (tokenizer + generation_config), honoured unless ignore_eos.
    eos_token_ids: frozenset[int] = field(default_factory=frozenset, repr=False)
    # Filled from bad_words and the tokenizer (see bad_words.py): by the server on its tokenizer thread, else by the
    # engine.
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    # Filled by the engine: allowed_token_ids, logit_bias, bad words and min_tokens' stop ids as arrays, built once
    # per request and shared by its samples (see token_tables.py).
    token_tables: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # As vLLM: forms are normalised, every range is verified, and only then are greedy requests' unused
        # knobs reset (so top_p=2 with temperature=0 is still refused).
        self._normalize()
        self._verify()
        if self.is_greedy:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    # -- normalisation, as vLLM does it before validating
    def _normalize(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.stop_token_ids is not None:
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        self.stop_token_ids = self.stop_token_ids or []
        if self.bad_words is not None:
            self.bad_words = list(dict.fromkeys(self.bad_words))
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0
        self._verify_types()
        if 0 < self.temperature < _MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s and was raised to it", self.temperature, _MIN_TEMPERATURE)
            self.temperature = _MIN_TEMPERATURE
        if self.logit_bias is not None:
            check_table_size("logit_bias", len(self.logit_bias))
            self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValidationError(
                f"structured_outputs must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}",
                parameter="structured_outputs",
            )
        if self.best_of is not None and self.best_of != self.n:
            if self.best_of < self.n:
                raise ValidationError(
                    f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.",
                    parameter="best_of", value=self.best_of,
                )
            raise ValidationError(
                f"best_of={self.best_of} > n={self.n} is not supported (as in vLLM V1): every generated sample is "
                f"returned; ask for n={self.best_of} and rank them by their logprobs",
                parameter="best_of", value=self.best_of,
            )

    def _verify(self) -> None:
        def fail(message: str, parameter: str) -> None:
            raise ValidationError(message, parameter=parameter, value=getattr(self, parameter))

        if self.n < 1:
            fail(f"n must be at least 1, got {self.n}.", "n")
        if self.n > MAX_N:
            fail(f"n must be at most {MAX_N}, got {self.n}.", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                fail(f"{name} must be in [-2, 2], got {value}.", name)
        if not math.isfinite(self.repetition_penalty):
            fail(f"repetition_penalty must be a finite number, got {self.repetition_penalty}.", "repetition_penalty")
        if self.repetition_penalty <= 0.0:
            fail(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.", "repetition_penalty")
        if not math.isfinite(self.temperature):
            fail(f"temperature must be a finite number, got {self.temperature}.", "temperature")
        if not 0.0 <= self.temperature <= 2.0:
            fail(f"temperature must be in [0, 2], got {self.temperature}.", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            fail(f"top_k must be an integer, got {type(self.top_k).__name__}", "top_k")
        if self.top_k < 0:
            fail(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}.", "min_p")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")
        if self.min_tokens < 0:
            fail(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.",
                "min_tokens",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < -1:
                fail(f"{name} must be non-negative or -1, got {value}.", name)
        if self.truncate_prompt_tokens is not None and not (
            self.truncate_prompt_tokens == -1 or self.truncate_prompt_tokens >= 1
        ):
            fail(
                f"truncate_prompt_tokens must be an integer >= 1 or -1, got {self.truncate_prompt_tokens}",
                "truncate_prompt_tokens",
            )
        if any(s == "" for s in self.stop):
            fail("stop cannot contain an empty string.", "stop")
        if self.stop and not self.detokenize:
            fail("stop strings are only supported when detokenize is True. Set detokenize=True to use stop.", "stop")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            fail(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.", "stop_token_ids")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            fail("allowed_token_ids is not None and empty!", "allowed_token_ids")
        if self.bad_words is not None and any(w == "" for w in self.bad_words):
            fail("bad_words cannot contain an empty string.", "bad_words")
        if self.is_greedy and self.n > 1:
            fail(f"n must be 1 when using greedy sampling, got {self.n}.", "n")

    def _verify_types(self) -> None:
        """Integers are ints within int64 (torch's widest; larger ones overflow inside a step and fail every
        request in it), floats are real numbers: checked before any range check compares them."""
        if not isinstance(self.n, int) or isinstance(self.n, bool):
            raise ValidationError(f"n must be an int, but is of type {type(self.n).__name__}", parameter="n", value=self.n)
        for name in _INT_FIELDS:
            check_int64(name, getattr(self, name))
        if self.allowed_token_ids is not None:
            check_table_size("allowed_token_ids", len(self.allowed_token_ids))
        if self.bad_words is not None:  # before tokenizing: each word gives at least one token sequence
            check_table_size("bad_words", len(self.bad_words))
        for name in ("stop_token_ids", "allowed_token_ids"):
            for token_id in getattr(self, name) or ():
                check_int64(name, token_id, value=getattr(self, name))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValidationError(
                    f"{name} must be a number, got {type(value).__name__}", parameter=name, value=value
                )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Tokens that end the request: stop_token_ids, and EOS unless ignore_eos."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else set(self.eos_token_ids))

    @property
    def min_tokens_stop_ids(self) -> set[int]:
        """Tokens masked while fewer than min_tokens were generated: EOS included even with ignore_eos (vLLM's
        `_all_stop_token_ids` always holds it for min-tokens processing)."""
        return set(self.stop_token_ids) | set(self.eos_token_ids)

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    def for_sample(self, index: int) -> SamplingParams:
        """The params of sample `index` of an n > 1 request: n = 1 and its own seed. A shallow copy: the samples
        share the tables (logit_bias, allowed_token_ids, token_tables, ...), which nothing changes once added."""
        child = copy.copy(self)
        child.n = 1
        if self.seed is not None:
            child.seed = self.seed + index
        return child

    def verify_for_vocab(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks that need the model: token ids in range, logprob counts within the server's cap."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name) or []
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValidationError(
                    f"token_id(s) {bad} in {name} contain out-of-vocab token ids. Vocabulary size: {vocab_size}",
                    parameter=name, value=ids,
                )
        bad_bias = [t for t in (self.logit_bias or {}) if not 0 <= t < vocab_size]
        if bad_bias:
            raise ValidationError(
                f"token_id(s) {bad_bias} in logit_bias contain out-of-vocab token ids. Vocabulary size: {vocab_size}",
                parameter="logit_bias", value=self.logit_bias,
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and max_logprobs != -1 and (value == -1 or value > max_logprobs):
                requested = vocab_size if value == -1 else value
                raise ValidationError(
                    f"Requested {'sample' if name == 'logprobs' else 'prompt'} logprobs of {requested}, "
                    f"which is greater than max allowed: {max_logprobs}",
                    parameter=name, value=value,
                )
