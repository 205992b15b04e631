"""Prompts with images -> token ids with the placeholders expanded, and each image's encoder inputs.

The model folder's own AutoProcessor does both (hfbridge never guesses how many tokens an image takes): the whole
prompt with its images gives the expanded ids; each image alone gives its encoder inputs, so the encoder can run,
and be cached, one image at a time."""
from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any, Callable

import numpy as np
import torch
import transformers

from hfbridge.config import MODALITIES, ModelConfig, MultiModalConfig
from hfbridge.errors import ValidationError
from hfbridge.multimodal.inputs import ImageItem, MultiModalInputs, placeholder_runs
from hfbridge.multimodal.media import PixelBudget, check_image, check_image_count

logger = logging.getLogger(__name__)


def image_token_id(hf_config: Any) -> int | None:
    """The placeholder token the model's embeddings scatter into (Transformers' config names for it)."""
    for config in (hf_config, hf_config.get_text_config()):
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
    return None


def is_multimodal(hf_config: Any) -> bool:
    """A model with a vision tower beside its text model, that names its image placeholder token."""
    return getattr(hf_config, "vision_config", None) is not None and image_token_id(hf_config) is not None


# Families whose image tokens attend to each other in both directions (their own mask functions): the "vllm"
# entry's paged attention is causal, so their images would be read wrong.
BIDIRECTIONAL_IMAGE_TYPES = frozenset({"gemma3n", "gemma4", "paligemma"})
# Families whose tokens of one image attend to each other both ways, which the torch backend computes from the
# step's bidirectional spans (Transformers' token_type_ids blocks, one per run of placeholders).
BIDIRECTIONAL_BLOCK_TYPES = frozenset({"gemma3"})


# Families whose images hfbridge's generic path (the processor's placeholders, get_image_features, rows scattered in
# placeholder order) gives exactly as Transformers does: each one checked by tests/test_vision.py. Another family
# may place its images otherwise (cross-attention, query tokens, image token ids): its images are refused until it
# is checked, never served possibly wrong.
VERIFIED_IMAGE_TYPES = frozenset({"llava", "llava_next", "vipllava", "idefics2", "idefics3", "smolvlm", "gemma3",
                                  "aya_vision", "qwen2_vl", "qwen2_5_vl", "mistral3"})
# Families with multi-axis rotary positions whose get_rope_index the runner calls (multimodal/mrope.py)
MROPE_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})


# Keyword arguments a family's processor adds when it calls its image processor, which hfbridge calls directly (one
# image at a time), from the model's config: PixtralProcessor resizes Mistral 3's images to whole merged patches.
IMAGE_PROCESSOR_KWARGS: dict[str, Callable[[Any], dict]] = {
    "mistral3": lambda c: {"patch_size": c.vision_config.patch_size * c.spatial_merge_size},
}


def image_refusal(hf_config: Any) -> str | None:
    """Why this model's images cannot be served yet (its text still can), or None."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in BIDIRECTIONAL_IMAGE_TYPES:
        return (f"{model_type}'s image tokens attend to each other in both directions, and hfbridge's paged "
                "attention is causal")
    if model_type not in MROPE_TYPES:
        for arch in getattr(hf_config, "architectures", None) or ():
            if _has_rope_index(arch):
                return (f"{arch} gives image tokens multi-axis rotary positions (M-RoPE, get_rope_index), which "
                        f"hfbridge computes only for {', '.join(sorted(MROPE_TYPES))} so far")
    if model_type not in VERIFIED_IMAGE_TYPES:
        return (f"hfbridge has not checked {model_type} images against Transformers yet (checked: "
                f"{', '.join(sorted(VERIFIED_IMAGE_TYPES))})")
    return None


def _has_rope_index(arch: str) -> bool:
    """Whether the module defining `arch` has a class with get_rope_index (the M-RoPE families' own)."""
    module = sys.modules.get(getattr(getattr(transformers, arch, None), "__module__", ""), None)
    return module is not None and any(isinstance(c, type) and hasattr(c, "get_rope_index")
                                      for c in vars(module).values())


class MultiModalProcessor:
    def __init__(self, model_config: ModelConfig, config: MultiModalConfig, attention_backend: str = "torch"):
        self.config = config
        self.model = model_config.model
        self.image_token_id = image_token_id(model_config.hf_config)
        self.refusal = image_refusal(model_config.hf_config)
        model_type = getattr(model_config.hf_config, "model_type", None)
        self.bidirectional = model_type in BIDIRECTIONAL_BLOCK_TYPES
        kwargs_of = IMAGE_PROCESSOR_KWARGS.get(model_type)
        self.image_kwargs = kwargs_of(model_config.hf_config) if kwargs_of is not None else {}
        if self.bidirectional and attention_backend != "torch" and self.refusal is None:
            self.refusal = (f"its image tokens attend to each other both ways, which only attention_backend='torch' "
                            f"computes (this engine runs {attention_backend!r})")
        self.processor = None  # expands text prompts' placeholders
        self.image_processor = None  # prepares each image
        self.text_refusal = None  # why text prompts with images cannot be expanded (token ids still can)
        source = dict(pretrained_model_name_or_path=model_config.model_path,
                      trust_remote_code=model_config.trust_remote_code, revision=model_config.revision)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(**source)
            self.image_processor = getattr(self.processor, "image_processor", None)
        except (OSError, ValueError, TypeError, ImportError, AttributeError) as e:  # e.g. it needs torchvision
            why = f"its processor (AutoProcessor) could not be loaded: {str(e).strip()[:300]}"
            try:  # the image processor alone still serves prompts whose placeholders are expanded already
                self.image_processor = transformers.AutoImageProcessor.from_pretrained(**source)
                self.text_refusal = (f"{why}; send prompt_token_ids with each image's placeholder tokens expanded "
                                     "as the processor would")
            except (OSError, ValueError, TypeError, ImportError, AttributeError):
                self.refusal = self.refusal or why
        if self.image_processor is None:
            self.refusal = self.refusal or f"its processor ({type(self.processor).__name__}) has no image processor"
        if self.refusal is not None:
            logger.warning("Prompts with images are refused: %s", self.refusal)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) if self.processor is not None else None

    def process(self, text: str | None, token_ids: list[int] | None, data: Any,
                add_special_tokens: bool = True) -> tuple[list[int], MultiModalInputs]:
        """text (placeholders as the processor expects them, e.g. "<image>") or token_ids (placeholders already
        expanded) with multi_modal_data {"image": image or list}."""
        if self.refusal is not None:
            raise ValidationError(f"{self.model} cannot take images yet: {self.refusal}; send text only",
                                  parameter="multi_modal_data")
        images = self._images(data)
        if token_ids is None and self.text_refusal is not None:
            raise ValidationError(f"{self.model} cannot expand the images of a text prompt: {self.text_refusal}",
                                  parameter="multi_modal_data")
        if token_ids is None:
            try:
                out = self.processor(text=[text], images=images, add_special_tokens=add_special_tokens)
            except (ValueError, TypeError, IndexError) as e:  # e.g. placeholders and images do not pair up
                raise ValidationError(f"the processor could not pair the prompt with its {len(images)} image(s): "
                                      f"{str(e)[:300]}", parameter="multi_modal_data") from None
            token_ids = [int(t) for t in out["input_ids"][0]]
        positions = np.flatnonzero(np.asarray(token_ids) == self.image_token_id).astype(np.int64)
        if not positions.size:
            raise ValidationError(
                f"the prompt has {len(images)} image(s) but no image placeholder token (id {self.image_token_id}); "
                "put the processor's image token in the text where each image goes, or use chat messages",
                parameter="multi_modal_data",
            )
        blocks = placeholder_runs(positions) if self.bidirectional else ()
        longest = max((end - first for first, end in blocks), default=0)
        if longest > self.config.max_num_encoder_input_tokens:
            raise ValidationError(
                f"an image takes {longest} tokens that must run in one step, more than max_num_batched_tokens "
                f"({self.config.max_num_encoder_input_tokens}); raise --max-num-batched-tokens",
                parameter="multi_modal_data",
            )
        return token_ids, MultiModalInputs(tuple(self._item(image) for image in images), positions, blocks)

    def _images(self, data: Any) -> list:
        if not isinstance(data, dict):
            raise ValidationError(f"multi_modal_data must be a dict such as {{'image': image}}, got "
                                  f"{type(data).__name__}", parameter="multi_modal_data")
        unknown = sorted(set(data) - set(MODALITIES))
        if unknown:
            raise ValidationError(f"multi_modal_data {unknown} is not supported: hfbridge serves "
                                  f"{list(MODALITIES)} inputs", parameter="multi_modal_data")
        images = data.get("image")
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValidationError("multi_modal_data holds no image", parameter="multi_modal_data")
        check_image_count(len(images), self.config, "multi_modal_data")
        budget = PixelBudget(self.config, "multi_modal_data")
        return [check_image(image, budget) for image in images]

    def _item(self, image) -> ImageItem:
        digest = hashlib.sha256(f"{image.mode}\0{image.size}\0".encode())
        digest.update(image.tobytes())
        try:
            inputs = self.image_processor(images=[image], return_tensors="pt", **self.image_kwargs)
        except (ValueError, TypeError, OSError) as e:
            raise ValidationError(f"the image processor could not read the image: {str(e)[:300]}",
                                  parameter="multi_modal_data") from None
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return ImageItem(digest.digest(), tensors)
