"""Tiny random vision-language models of several families, each saved with its own processor (the tokenizer
trained in tiny_models.py plus the family's placeholder tokens, and its image processor at small sizes).

Nothing is downloaded; the images are drawn here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from tiny_models import COMMON, _trained_tokenizer_json, build_tokenizer

# A chat template that loops over content parts, as VLM processors' templates do: "<image>"-style placeholders
# where the image parts are.
VISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ IMAGE }}{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def draw_image(seed: int, size: tuple[int, int] = (40, 52)) -> Image.Image:
    """A random RGB image (width, height)."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _tokenizer(*tokens: str):
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tokenizer


def _text(tokenizer, **overrides):
    vocab = (len(tokenizer) + 7) // 8 * 8
    return transformers.LlamaConfig(**{**COMMON, "vocab_size": vocab, **overrides})


def _clip_llava(config_class, **config_kwargs):
    """A LLaVA-style family (CLIP tower, LlavaProcessor): the config of `config_class` and its processor."""
    tokenizer = _tokenizer("<image>")
    config = config_class(
        vision_config=transformers.CLIPVisionConfig(**VISION, image_size=28, patch_size=14),
        text_config=_text(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **config_kwargs,
    )
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return config, processor, "<image>"


def llava():
    return _clip_llava(transformers.LlavaConfig, vision_feature_layer=-1)


def vipllava():
    return _clip_llava(transformers.VipLlavaConfig, vision_feature_layers=[-2, -1])


def llava_next():
    tokenizer = _tokenizer("<image>")
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION, image_size=28, patch_size=14),
        text_config=_text(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-1,
    )
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
    )
    processor = transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return config, processor, "<image>"


def idefics3():
    tokenizer = _tokenizer("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
    config = transformers.Idefics3Config(
        vision_config=dict(**VISION, image_size=28, patch_size=14),
        text_config=_text(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    image_processor = transformers.Idefics3ImageProcessor(
        size={"longest_edge": 56}, max_image_size={"longest_edge": 28}, do_image_splitting=True,
    )
    processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                               image_seq_len=1)
    return config, processor, "<image>"


def idefics2():
    tokenizer = _tokenizer("<fake_token_around_image>", "<image>", "<end_of_utterance>")
    config = transformers.Idefics2Config(
        vision_config=dict(**VISION, image_size=28, patch_size=14),
        perceiver_config=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                              num_key_value_heads=1, hidden_size=64),
        text_config=transformers.MistralConfig(**{**COMMON, "vocab_size": (len(tokenizer) + 7) // 8 * 8}),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    image_processor = transformers.Idefics2ImageProcessor(size={"longest_edge": 28, "shortest_edge": 28},
                                                          do_image_splitting=False)
    processor = transformers.Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4)
    return config, processor, "<image>"


def gemma3():
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    text = transformers.Gemma3TextConfig(**{**COMMON, "vocab_size": (len(tokenizer) + 7) // 8 * 8},
                                         sliding_window=8, query_pre_attn_scalar=16,
                                         layer_types=["sliding_attention", "full_attention"])
    config = transformers.Gemma3Config(
        vision_config=transformers.SiglipVisionConfig(**VISION, image_size=28, patch_size=7),
        text_config=text, mm_tokens_per_image=4, boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id, image_token_index=tokenizer.image_token_id,
    )
    image_processor = transformers.Gemma3ImageProcessor(size={"height": 28, "width": 28})
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4)
    return config, processor, "<start_of_image>"


def aya_vision():
    tokenizer = _tokenizer("<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")
    config = transformers.AyaVisionConfig(
        vision_config=transformers.SiglipVisionConfig(**VISION, image_size=28, patch_size=7),
        text_config=transformers.Cohere2Config(**{**COMMON, "vocab_size": (len(tokenizer) + 7) // 8 * 8},
                                               sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2,
        tie_word_embeddings=False,
    )
    image_processor = transformers.GotOcr2ImageProcessor(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                         min_patches=1, max_patches=2)
    processor = transformers.AyaVisionProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                                                img_size=28, downsample_factor=2)
    return config, processor, "<image>"


FAMILIES = {
    "LlavaForConditionalGeneration": llava,
    "LlavaNextForConditionalGeneration": llava_next,
    "VipLlavaForConditionalGeneration": vipllava,
    "Idefics3ForConditionalGeneration": idefics3,
    "Idefics2ForConditionalGeneration": idefics2,
    "Gemma3ForConditionalGeneration": gemma3,
    "AyaVisionForConditionalGeneration": aya_vision,
}


def make_tiny_vlm(arch: str, folder: Path, seed: int = 0):
    """(Transformers model, processor, the prompt's image placeholder, folder)."""
    config, processor, placeholder = FAMILIES[arch]()
    processor.chat_template = VISION_TEMPLATE.replace("IMAGE", repr(placeholder))
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # spread the zero-initialised biases so every part of the model matters
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" not in name:
                param.normal_(0, 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, placeholder, folder


QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def make_tiny_qwen2_vl(folder: Path, seed: int = 0, version: str = "2"):
    """(model, image processor, tokenizer, folder) of a tiny Qwen2-VL (version "2.5": Qwen2.5-VL, whose vision tower
    attends in windows), saved with its image processor and tokenizer but no Qwen2VLProcessor: that one needs
    torchvision (its video processor), which this machine lacks, so its prompts come as token ids with the
    placeholders expanded (expand_qwen2_vl)."""
    tokenizer = _tokenizer(*QWEN2_VL_TOKENS)
    ids = dict(zip(QWEN2_VL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN2_VL_TOKENS))))
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vocab = (len(tokenizer) + 7) // 8 * 8
    if version == "2.5":
        text = transformers.Qwen2_5_VLTextConfig(**{**COMMON, "vocab_size": vocab}, rope_parameters=rope)
        vision = transformers.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                     out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        text = transformers.Qwen2VLTextConfig(**{**COMMON, "vocab_size": vocab}, rope_parameters=rope)
        vision = transformers.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=56 * 56 * 4, patch_size=14,
                                                         merge_size=2, temporal_patch_size=2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, image_processor, tokenizer, folder


def expand_qwen2_vl(tokenizer, image_processor, parts: list) -> tuple[list[int], dict]:
    """Text pieces and images in order -> (token ids, the image processor's outputs for all images), each image as
    Qwen2VLProcessor writes it: <|vision_start|>, grid_t * grid_h * grid_w / merge_size^2 <|image_pad|>,
    <|vision_end|>."""
    ids, images = [], [p for p in parts if not isinstance(p, str)]
    pixels = image_processor(images=images, return_tensors="pt") if images else {}
    grids = iter(pixels["image_grid_thw"].tolist()) if images else iter(())
    start, end, pad = tokenizer.convert_tokens_to_ids(list(QWEN2_VL_TOKENS[:3]))
    for part in parts:
        if isinstance(part, str):
            ids += tokenizer(part).input_ids
        else:
            t, h, w = next(grids)
            ids += [start] + [pad] * (t * h * w // image_processor.merge_size ** 2) + [end]
    return ids, pixels


def make_tiny_smolvlm(folder: Path, seed: int = 0):
    """(model, image processor, tokenizer, folder) of a tiny SmolVLM, saved without its SmolVLMProcessor (its video
    processor needs torchvision): prompts come as token ids, expand_tiles() writing each image's placeholders."""
    tokenizer = _tokenizer("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
    config = transformers.SmolVLMConfig(
        vision_config=dict(**VISION, image_size=28, patch_size=14),
        text_config=_text(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    torch.manual_seed(seed)
    model = transformers.SmolVLMForConditionalGeneration(config).eval()
    image_processor = transformers.SmolVLMImageProcessor(size={"longest_edge": 56}, max_image_size={"longest_edge": 28},
                                                         do_image_splitting=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, image_processor, tokenizer, folder


def expand_tiles(tokenizer, image_processor, config, parts: list) -> tuple[list[int], dict]:
    """Text pieces and images -> (token ids, the image processor's outputs): each image's placeholders as runs of
    <image> between <fake_token_around_image>, one run of (image_size / patch_size / scale_factor)^2 per tile."""
    images = [p for p in parts if not isinstance(p, str)]
    pixels = image_processor(images=images, return_tensors="pt") if images else {}
    fake, image = tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<image>"])
    per_tile = (config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor) ** 2
    ids = []
    for part in parts:
        if isinstance(part, str):
            ids += tokenizer(part).input_ids
            continue
        tiles = image_processor(images=[part], return_tensors="pt")["pixel_values"].shape[1]
        for _ in range(tiles):
            ids += [fake] + [image] * per_tile
        ids += [fake]
    return ids, pixels


PIXTRAL_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


def make_tiny_mistral3(folder: Path, seed: int = 0, pixtral: bool = False):
    """(model, image processor, tokenizer, folder) of a tiny Mistral 3 (Pixtral vision tower, patches merged 2x2; or
    with `pixtral`, Pixtral-12B's layout: LLaVA with a Pixtral tower, no merge), saved without its PixtralProcessor
    (it needs torchvision): prompts come as token ids, expand_pixtral() writing each image's placeholders."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = _tokenizer(*PIXTRAL_TOKENS)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, head_dim=16, image_size=56, patch_size=7)
    common = dict(vision_config=vision, text_config=transformers.MistralConfig(**_text(tokenizer).to_dict()),
                  image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1)
    torch.manual_seed(seed)
    if pixtral:
        config = transformers.LlavaConfig(**common, vision_feature_select_strategy="full")
        model = transformers.LlavaForConditionalGeneration(config).eval()
    else:
        config = transformers.Mistral3Config(**common, spatial_merge_size=2)
        model = transformers.Mistral3ForConditionalGeneration(config).eval()
    # patch_size as stored by real checkpoints: the vision tower's; PixtralProcessor doubles it when it merges
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size=7)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # what PixtralProcessor.save_pretrained writes, as real checkpoints have it (AutoProcessor then needs torchvision)
    (folder / "processor_config.json").write_text(json.dumps(dict(
        processor_class="PixtralProcessor", patch_size=7, spatial_merge_size=getattr(config, "spatial_merge_size", 1),
        image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")))
    return model, image_processor, tokenizer, folder


def expand_pixtral(tokenizer, image_processor, config, parts: list) -> tuple[list[int], dict]:
    """Text pieces and images -> (token ids, the image processor's outputs), as PixtralProcessor writes them: the
    images resized to whole merged patches (patch_size x spatial_merge_size), each as rows of [IMG] tokens ending in
    [IMG_BREAK], the last one in [IMG_END]."""
    images = [p for p in parts if not isinstance(p, str)]
    merged = config.vision_config.patch_size * getattr(config, "spatial_merge_size", 1)
    pixels = image_processor(images=images, patch_size=merged, return_tensors="pt") if images else {}
    sizes = iter(pixels["image_sizes"].tolist()) if images else iter(())
    image, row_break, end = tokenizer.convert_tokens_to_ids(list(PIXTRAL_TOKENS))
    ids = []
    for part in parts:
        if isinstance(part, str):
            ids += tokenizer(part).input_ids
            continue
        height, width = next(sizes)
        placeholders = ([image] * (width // merged) + [row_break]) * (height // merged)
        ids += placeholders[:-1] + [end]
    return ids, pixels


def mistral3_prompt(model, image_processor, tokenizer, parts: list) -> tuple[list[int], dict]:
    ids, pixels = expand_pixtral(tokenizer, image_processor, model.config, parts)
    return ids, dict(pixels)


def qwen2_vl_prompt(model, image_processor, tokenizer, parts: list) -> tuple[list[int], dict]:
    """(token ids, Transformers' generate() inputs beside them) of a Qwen2-VL prompt of text pieces and images."""
    ids, pixels = expand_qwen2_vl(tokenizer, image_processor, parts)
    if not pixels:
        return ids, {}
    return ids, dict(pixels, mm_token_type_ids=(torch.tensor([ids]) == model.config.image_token_id).int())


def smolvlm_prompt(model, image_processor, tokenizer, parts: list) -> tuple[list[int], dict]:
    ids, pixels = expand_tiles(tokenizer, image_processor, model.config, parts)
    return ids, dict(pixels)


# Families checked with token-id prompts (their processors need torchvision): class -> (make, prompt)
TOKEN_ID_FAMILIES = {
    "Qwen2VLForConditionalGeneration": (lambda folder: make_tiny_qwen2_vl(folder, version="2"), qwen2_vl_prompt),
    "Qwen2_5_VLForConditionalGeneration": (lambda folder: make_tiny_qwen2_vl(folder, version="2.5"),
                                           qwen2_vl_prompt),
    "SmolVLMForConditionalGeneration": (make_tiny_smolvlm, smolvlm_prompt),
    "Mistral3ForConditionalGeneration": (make_tiny_mistral3, mistral3_prompt),
    "LlavaForConditionalGeneration (Pixtral)": (lambda folder: make_tiny_mistral3(folder, pixtral=True),
                                                mistral3_prompt),
}


def token_id_case(model, image_processor, tokenizer, prompt_of, parts: list, max_new_tokens: int):
    """One prompt of a TOKEN_ID_FAMILIES family: (the engine's prompt, Transformers' greedy tokens and their logits,
    the inputs Transformers' forward takes beside the ids)."""
    ids, inputs = prompt_of(model, image_processor, tokenizer, parts)
    images = [p for p in parts if not isinstance(p, str)]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True, **inputs)
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": images}} if images else ids
    return prompt, (out.sequences[0, len(ids):].tolist(), [s[0] for s in out.logits]), inputs
