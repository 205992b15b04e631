"""One step's scheduled tokens, flattened into one stream.

Inputs per step (T tokens of B requests): input_ids / positions [1, T], AttentionMetadata, and logits_indices,
the token indices whose next-token logits are needed (last token of each request that samples, plus prompt
positions of requests asking for prompt logprobs). Everything else never reaches the LM head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hfbridge.attention_backends import AttentionMetadata
from hfbridge.core.scheduler_output import ScheduledRequest
from hfbridge.multimodal.embeddings import ImageRows


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [N_prompt + N_sample]
    token_type_ids: torch.Tensor | None  # [1, T] segment ids, when a request carries them (sentence pairs)
    sample_requests: list[ScheduledRequest]  # the last N_sample rows of the logits, in order
    # per request: (first logits row, first prompt position, target prompt token ids, top-k) of its
    # prompt-logprob positions this step
    prompt_logprob_rows: dict[str, tuple[int, int, list[int], int]]
    # (LoRARequest, first token row, end row) of each request under an adapter, in step order (enable_lora)
    lora_rows: list[tuple[Any, int, int]] = field(default_factory=list)
    # the requests whose tokens this step include image placeholders (a vision-language model's prompts)
    image_rows: list[ImageRows] = field(default_factory=list)


def samples(item: ScheduledRequest) -> bool:
    """Whether the step samples a token for this request (its last scheduled token has a logits row)."""
    return item.produces_output and item.request.sampling_params is not None


def prepare_inputs(scheduled: list[ScheduledRequest], block_size: int, device: torch.device) -> StepInputs:
    bs = block_size
    ids, positions, slots, logits_indices = [], [], [], []
    query_lens, seq_lens, tables = [], [], []
    prompt_rows: dict[str, tuple[int, int, list[int], int]] = {}
    lora_rows, image_rows, spans = [], [], []
    offset = 0
    for index, item in enumerate(scheduled):
        request = item.request
        images = getattr(request, "mm_inputs", None)
        if images is not None and images.covers(item.start, item.end):
            image_rows.append(ImageRows(request.request_id, images, offset, item.start, item.end))
        if images is not None:
            spans += [(index, first, end) for first, end in images.bidirectional_blocks
                      if first < item.end and end > item.start]
        lora_request = getattr(request, "lora_request", None)
        if lora_request is not None:
            lora_rows.append((lora_request, offset, offset + item.num_new_tokens))
        pos = np.arange(item.start, item.end)
        ids.extend(request.all_token_ids[item.start : item.end])
        positions.append(pos)
        slots.append(np.asarray(item.block_ids, dtype=np.int64)[pos // bs] * bs + pos % bs)
        query_lens.append(item.num_new_tokens)
        seq_lens.append(item.end)
        tables.append(item.block_ids)
        if request.wants_prompt_logprobs:
            # logits at prompt position p predict prompt token p + 1
            last = min(item.end, request.num_prompt_tokens - 1)
            if last > item.start:
                prompt_rows[request.request_id] = (
                    len(logits_indices),
                    item.start,
                    request.prompt_token_ids[item.start + 1 : last + 1],
                    request.sampling_params.prompt_logprobs,
                )
                logits_indices.extend(range(offset, offset + last - item.start))
        offset += item.num_new_tokens
    ends = np.cumsum(query_lens)
    sample_requests, sample_rows = [], []
    for i, item in enumerate(scheduled):
        if samples(item):
            sample_requests.append(item)
            sample_rows.append(int(ends[i]) - 1)
    metadata = AttentionMetadata.build(
        slot_mapping=np.concatenate(slots).tolist() if slots else [],
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=tables,
        device=device,
        bidirectional_spans=tuple(spans),
    )
    pos_tensor = torch.from_numpy(np.concatenate(positions)) if positions else torch.zeros(0, dtype=torch.long)
    token_types = None
    if any(item.request.token_type_ids is not None for item in scheduled):
        types = [t for item in scheduled for t in _token_types(item)]
        token_types = torch.tensor(types, dtype=torch.long, device=device)[None]
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device)[None],
        positions=pos_tensor.to(device)[None],
        metadata=metadata,
        logits_indices=torch.tensor(logits_indices + sample_rows, dtype=torch.long, device=device),
        token_type_ids=token_types,
        sample_requests=sample_requests,
        prompt_logprob_rows=prompt_rows,
        lora_rows=lora_rows,
        image_rows=image_rows,
    )


def _token_types(item: ScheduledRequest) -> list[int]:
    types = item.request.token_type_ids
    return types[item.start : item.end] if types is not None else [0] * item.num_new_tokens
