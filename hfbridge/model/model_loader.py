"""Build a model on the meta device through Transformers, then stream its weights in."""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from hfbridge.attention_backends import ATTENTION_NAME, register_vllm_attention
from hfbridge.config import ModelConfig
from hfbridge.model.compatibility import check_compatible
from hfbridge.model.model_resolver import ModelClass, resolve_model_class
from hfbridge.pooling.pooling_model import TransformersEmbeddingModel, TransformersForSequenceClassification
from hfbridge.model.transformers_model import BaseModelWithLMHead, TransformersForCausalLM, TransformersForMultimodalLM
from hfbridge.multimodal.processor import is_multimodal
from hfbridge.model.weight_loader import iter_checkpoint, load_weights, missing_parameters
from hfbridge.native_overrides.quantized import install_quantized
from hfbridge.native_overrides.weights import checkpoint_names
from hfbridge.model.hf_config import GGUF_READ_ERRORS, unreadable_gguf
from hfbridge.quantization import gguf_kernels
from hfbridge.quantization.gguf_checkpoint import QuantizedWeight, read_gguf_weights
from hfbridge.quantization.quantized_linear import install_quantized_linears
from hfbridge.model.pipeline_stage import install_stage_forward
from hfbridge.model.pp_probe import check_pp_split
from hfbridge.parallel.pp_plan import check_pp_plan as check_stage_plan
from hfbridge.parallel.pp_plan import split_stages
from hfbridge.parallel.state import PPGroup, TPGroup, get_pp_group, get_tp_group
from hfbridge.parallel.tp_plan import shard_model

logger = logging.getLogger(__name__)


# init_empty_weights patches torch.nn.Module for the whole process while it is active: two threads building at
# once would leave the patch in place for good (every later model would start on meta). One build at a time.
_BUILD_LOCK = threading.Lock()


def build_on_meta(model_class: ModelClass, model_config: ModelConfig) -> nn.Module:
    """Parameters on meta, buffers (rotary tables) real; the config copy keeps the caller's config untouched."""
    register_vllm_attention()
    config = copy.deepcopy(model_config.hf_config)
    with _BUILD_LOCK, init_empty_weights(include_buffers=False):
        model = model_class.cls._from_config(config, attn_implementation=attention_implementation(config),
                                             dtype=model_config.dtype)
    if model_class.needs_lm_head:
        model = BaseModelWithLMHead(model, config)
    return model.eval()


def attention_implementation(config) -> str | dict[str, str]:
    """"vllm" for the text model's attention; a vision or audio tower beside it keeps Transformers' default
    (sdpa): it runs whole over one image, outside the KV cache."""
    text_config = config.get_text_config()
    keys = [key for key in getattr(config, "sub_configs", {}) if getattr(config, key, None) is text_config]
    if text_config is config or not keys:
        return ATTENTION_NAME
    return {"": ATTENTION_NAME, keys[0]: ATTENTION_NAME}


def load_checkpoint_into(model: nn.Module, model_config: ModelConfig, device: torch.device) -> None:
    if isinstance(model, BaseModelWithLMHead):
        weights = _weights(model_config, model.base_model, device)
        prefix, conversion_source = model.prefix, model.base_model
    else:
        weights = _weights(model_config, model, device)
        prefix, conversion_source = getattr(model, "base_model_prefix", ""), None
    load_weights(model, weights, device, prefix, conversion_source)
    if hasattr(model, "tie_weights") and get_pp_group().is_last:  # only the last stage holds the head
        model.tie_weights()
    missing = missing_parameters(model)
    if missing:
        raise ValueError(
            f"The checkpoint in {model_config.model_path} has no weights for {len(missing)} model tensors "
            f"(e.g. {missing[:5]}); it does not match the config's architecture {model_config.architectures}"
        )
    model.to(device)


def _weights(model_config: ModelConfig, model: nn.Module, device: torch.device):
    """(name, lazy tensor) pairs; a GGUF file's quantized projections become QuantizedLinear modules of `model`
    (on meta) where the kernels serve them: one CPU process."""
    if model_config.gguf_file is None:
        return iter_checkpoint(model_config.model_path)
    single = device.type == "cpu" and get_tp_group().size == 1 and get_pp_group().size == 1
    tensors = gguf_tensors(model_config, model.state_dict(), lambda: model, single)
    tensors = install_quantized_linears(model, tensors)
    return ((name, (lambda t=t: t)) for name, t in tensors.items())


def gguf_tensors(model_config: ModelConfig, hf_names: Iterable[str], transformers_model: Callable[[], nn.Module],
                 quantized: bool) -> dict[str, torch.Tensor | QuantizedWeight]:
    """The GGUF file's tensors under the Transformers parameter names `hf_names`: quantized ones as QuantizedWeight
    where `quantized` and the architecture allow, else dequantized to float32. `transformers_model` (the model
    on meta) serves the architectures only Transformers' reader converts."""
    path = Path(model_config.model_path) / model_config.gguf_file
    try:
        tensors = read_gguf_weights(path, hf_names, model_config.hf_text_config)
    except GGUF_READ_ERRORS as e:  # gguf's reader names neither the file nor the problem
        raise ValueError(unreadable_gguf(path, e)) from e
    except NotImplementedError as e:  # Transformers' reader converts this architecture's tensors
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        logger.info("%s: GGUF architecture %r is served dequantized (Transformers' reader converts its tensors)",
                    path.name, str(e))
        return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=transformers_model())["tensors"]
    if not quantized:
        if any(isinstance(t, QuantizedWeight) for t in tensors.values()):
            logger.info("%s: dequantized at load (the quantized kernels serve one CPU process: no tensor or "
                        "pipeline parallelism, no GPU)", path.name)
        return {name: t.dequantize() if isinstance(t, QuantizedWeight) else t for name, t in tensors.items()}
    gguf_kernels.build_kernels()  # before the first request (a build takes seconds)
    return tensors


def load_native(model_class: ModelClass, model_config: ModelConfig, device: torch.device) -> nn.Module:
    """Allocate the native model on `device`, then fill its fused parameters from the checkpoint's tensors; a GGUF
    file's quantized tensors stay quantized on CPU (native_overrides.quantized)."""
    config = model_config.hf_text_config
    model = model_class.cls(config, model_config.dtype, model_config.max_model_len)  # on meta
    if model_config.gguf_file is None:
        weights = iter_checkpoint(model_config.model_path)
    else:  # the checkpoint's names are Transformers' (unfused), which the native names follow
        def twin() -> nn.Module:
            return build_on_meta(ModelClass("transformers", _transformers_twin(model_class)), model_config)

        tensors = gguf_tensors(model_config, checkpoint_names(model), twin, quantized=device.type == "cpu")
        tensors = install_quantized(model, tensors)
        weights = ((name, (lambda t=t: t)) for name, t in tensors.items())
    model.allocate(device).load_weights(weights)
    return model


def _transformers_twin(model_class: ModelClass) -> type:
    import transformers

    return getattr(transformers, model_class.cls.__name__)


def check_tp_plan(model_config: ModelConfig, tp: int) -> None:
    """Apply the plan to a throw-away meta model as rank 0 would: every refusal (no plan, unknown style, heads
    not divisible) surfaces here, in the driver, before any worker starts or any weight is read."""
    model_class = resolve_model_class(model_config, tensor_parallel_size=tp)
    if tp == 1 or model_class.impl == "native":
        return
    shard_model(build_on_meta(model_class, model_config), model_config.hf_text_config, TPGroup(0, tp))


def check_pp_plan(model_config: ModelConfig, pp: int) -> None:
    """Split a throw-away meta model's plan as every stage would: no plan, not exactly one ModuleList, a bad
    HFBRIDGE_PP_LAYER_PARTITION all surface in the driver, before any worker starts."""
    if pp == 1:
        return
    model_class = resolve_model_class(model_config, tensor_parallel_size=pp)
    hf_model = build_on_meta(model_class, model_config)
    check_stage_plan(hf_model.base_model, _num_layers(model_config), pp)
    check_pp_split(model_class.cls, model_config.hf_config, pp)


def _num_layers(model_config: ModelConfig) -> int | None:
    return getattr(model_config.hf_text_config, "num_hidden_layers", None)


def _split_stages(hf_model: nn.Module, model_config: ModelConfig, pp: PPGroup) -> None:
    base = hf_model.base_model
    heads = [(hf_model, name) for name, child in hf_model.named_children() if child is not base]  # the LM head
    tied = bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False))
    split_stages(base, heads, _num_layers(model_config), pp, tied)


def load_model(model_config: ModelConfig, device: torch.device) -> nn.Module:
    """The wrapped model for the config's runner: a causal LM, an embedding or a classification model."""
    start = time.perf_counter()
    pp = get_pp_group()
    # Native models have no parallel layers yet: under tp x pp > 1 the resolver falls back to Transformers.
    model_class = resolve_model_class(model_config, tensor_parallel_size=get_tp_group().size * pp.size)
    if model_class.impl == "native":
        model = load_native(model_class, model_config, device)
    else:
        check_compatible(model_class.cls, model_config.hf_config, model_config.runner, model_class.needs_lm_head)
        hf_model = build_on_meta(model_class, model_config)
        if pp.size > 1:  # this stage's layers only, on meta: the others are never read
            _split_stages(hf_model, model_config, pp)
        tp = get_tp_group()
        if tp.size > 1:  # shard on meta, so each rank reads only its slices
            shard_model(hf_model, model_config.hf_text_config, tp)
        load_checkpoint_into(hf_model, model_config, device)
        wrapper = _WRAPPERS[(model_config.runner, model_config.convert)]
        if wrapper is TransformersForCausalLM and is_multimodal(model_config.hf_config):
            wrapper = TransformersForMultimodalLM
        model = wrapper(hf_model)
        if pp.size > 1:
            install_stage_forward(model, pp, model_config.dtype)
    logger.info(
        "Loaded %s (%s, %s implementation of %s) in %.1fs", model_config.model, type(model).__name__,
        model_class.impl, model_class.cls.__name__, time.perf_counter() - start,
    )
    return model


_WRAPPERS = {
    ("generate", "none"): TransformersForCausalLM,
    ("pooling", "embed"): TransformersEmbeddingModel,
    ("pooling", "classify"): TransformersForSequenceClassification,
}
