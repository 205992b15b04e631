"""PoolingParams: vLLM's fields, the legacy aliases (normalize / softmax / activation) and its checks."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields

from hfbridge.config import PoolerConfig
from hfbridge.errors import ValidationError
from hfbridge.sample.sampling_params import check_int64

POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify")
_TASK_PARAMS = {
    "embed": ("dimensions", "use_activation"),
    "classify": ("use_activation",),
    "token_embed": ("dimensions", "use_activation"),
    "token_classify": ("use_activation", "step_tag_id", "returned_token_ids"),
}
_REMOVED_TASKS = {
    "score": "`score` task was removed; use `classify` instead.",
    "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead.",
}


@dataclass
class PoolingParams:
    task: str | None = None  # set by the API method (embed, classify, ...)
    use_activation: bool | None = None  # embed: L2-normalise; classify: sigmoid / softmax
    dimensions: int | None = None  # Matryoshka truncation
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    # Legacy (vLLM 0.11) switches, accepted as aliases of use_activation
    normalize: bool | None = None
    softmax: bool | None = None
    activation: bool | None = None

    def __post_init__(self) -> None:
        for alias in ("normalize", "softmax", "activation"):
            value = getattr(self, alias)
            if value is not None:
                warnings.warn(f"PoolingParams({alias}=...) is deprecated; use use_activation", DeprecationWarning, 2)
                if self.use_activation is None:
                    self.use_activation = value
                setattr(self, alias, None)
        if self.task in _REMOVED_TASKS:
            raise ValidationError(_REMOVED_TASKS[self.task], parameter="task", value=self.task)
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValidationError(f"task must be one of {list(POOLING_TASKS)}, got {self.task!r}", parameter="task")
        for name in ("dimensions", "step_tag_id", "truncate_prompt_tokens"):
            check_int64(name, getattr(self, name))
        for token_id in self.returned_token_ids or ():
            check_int64("returned_token_ids", token_id, value=self.returned_token_ids)
        if self.truncate_prompt_tokens is not None and not (
            self.truncate_prompt_tokens == -1 or self.truncate_prompt_tokens >= 1
        ):
            raise ValidationError(
                f"truncate_prompt_tokens must be an integer >= 1 or -1, got {self.truncate_prompt_tokens}",
                parameter="truncate_prompt_tokens", value=self.truncate_prompt_tokens,
            )

    def clone(self) -> PoolingParams:
        return copy.deepcopy(self)

    def resolve(self, task: str, model_name: str, hidden_size: int, is_matryoshka: bool, pooler: PoolerConfig) -> PoolingParams:
        """A copy bound to `task` with the pooler's defaults filled in; raises ValidationError on misuse."""
        params = self.clone()
        params.task = task
        allowed = _TASK_PARAMS[task]
        defaults = {"use_activation": None, "dimensions": None, "step_tag_id": None, "returned_token_ids": None}
        unsupported = [f.name for f in fields(self) if f.name in defaults and f.name not in allowed
                       and getattr(self, f.name) is not None]
        if unsupported:
            raise ValidationError(
                f"Task '{task}' only supports {list(allowed)} parameters, does not support {unsupported} parameters",
                parameter=unsupported[0],
            )
        if params.use_activation is None:
            params.use_activation = True if pooler.use_activation is None else pooler.use_activation
        if "dimensions" in allowed:
            if params.dimensions is None:
                params.dimensions = pooler.dimensions
            elif not is_matryoshka:
                raise ValidationError(
                    f"Model '{model_name}' does not support Matryoshka embeddings; dimensions must be unset "
                    f"(received dimensions={params.dimensions}).", parameter="dimensions", value=params.dimensions,
                )
            elif not 1 <= params.dimensions <= hidden_size:
                raise ValidationError(
                    f"Model '{model_name}' only supports dimensions in range [1, {hidden_size}], "
                    f"got {params.dimensions}.", parameter="dimensions", value=params.dimensions,
                )
        if task == "token_classify":
            params.step_tag_id = pooler.step_tag_id if params.step_tag_id is None else params.step_tag_id
            if params.returned_token_ids is None:
                params.returned_token_ids = pooler.returned_token_ids
        return params
