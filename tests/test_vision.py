"""Images in prompts, against Transformers' own greedy generate() with the same processor and inputs."""
import base64
import io
import re

import pytest
import torch
import transformers
from greedy import TIE_TOLERANCE, assert_greedy_match
from tiny_vlms import TOKEN_ID_FAMILIES, draw_image, make_tiny_vlm, token_id_case

from hfbridge import LLM, SamplingParams
from hfbridge.entrypoints.check import check_model
from hfbridge.errors import ValidationError

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
SERVED = ["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "VipLlavaForConditionalGeneration",
          "Idefics2ForConditionalGeneration", "Idefics3ForConditionalGeneration", "Gemma3ForConditionalGeneration",
          "AyaVisionForConditionalGeneration"]


@pytest.fixture(scope="module", params=SERVED)
def vlm(request, tmp_path_factory):
    return make_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_vlm("LlavaForConditionalGeneration", tmp_path_factory.mktemp("llava"))


def hf_greedy_with_images(model, processor, text, images, add_special_tokens=True):
    """(Transformers' greedy tokens, their logits) for one prompt with its images (None: text only)."""
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=add_special_tokens)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [s[0] for s in out.logits]


def check(outputs, expected):
    for output, (tokens, logits) in zip(outputs, expected, strict=True):
        assert_greedy_match(list(output.outputs[0].token_ids), tokens, logits)


def test_images_batched_with_text_equal_transformers(vlm):
    """One and two images per prompt, and a text-only prompt, in one batch: each equals Transformers alone."""
    model, processor, image, folder = vlm
    a, b = draw_image(1), draw_image(2, (64, 30))
    cases = [(f"Describe {image} briefly", [a]), ("Once upon a time", None),
             (f"Compare {image} with {image} now", [a, b]), (f"What is in {image}?", [b])]
    expected = [hf_greedy_with_images(model, processor, text, images) for text, images in cases]
    llm = LLM(model=str(folder), dtype="float32")
    prompts = [{"prompt": t, "multi_modal_data": {"image": i}} if i else t for t, i in cases]
    # the last one as token ids with the placeholders expanded already (the processor's own ids)
    ids = processor(text=cases[-1][0], images=cases[-1][1])["input_ids"][0]
    prompts[-1] = {"prompt_token_ids": list(ids), "multi_modal_data": {"image": cases[-1][1]}}
    check(llm.generate(prompts, GREEDY, use_tqdm=False), expected)


def test_chunked_prefill_cuts_through_an_image(tmp_path_factory):
    """A step budget of 8 tokens cuts LLaVA-NeXT's 30-row image span across several chunks."""
    model, processor, image, folder = make_tiny_vlm("LlavaNextForConditionalGeneration",
                                                    tmp_path_factory.mktemp("llava_next"))
    text, images = f"A picture {image} of what", [draw_image(3, (50, 50))]
    expected = hf_greedy_with_images(model, processor, text, images)
    llm = LLM(model=str(folder), dtype="float32", max_num_batched_tokens=8, max_num_seqs=2, max_model_len=256)
    out = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}}, "Hello"], GREEDY, use_tqdm=False)
    assert sum(t == model.config.image_token_index for t in out[0].prompt_token_ids) > 8
    check(out[:1], [expected])


def test_gemma3_image_tokens_attend_both_ways(tmp_path_factory):
    """Gemma 3's tokens of one image see each other both ways (Transformers' token_type_ids mask): every prompt
    logprob equals Transformers' own forward, also when a step budget of 8 tokens makes chunks stop before an
    image rather than cut it."""
    model, processor, image, folder = make_tiny_vlm("Gemma3ForConditionalGeneration",
                                                    tmp_path_factory.mktemp("gemma3"))
    text, images = f"One {image} and two {image} then some text after", [draw_image(8), draw_image(9)]
    inputs = processor(text=text, images=images, return_tensors="pt")
    assert inputs["token_type_ids"].sum() == 8  # two images of 4 tokens
    with torch.no_grad():
        reference = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
    ids = inputs["input_ids"][0].tolist()
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    for kwargs in ({}, {"max_num_batched_tokens": 8, "max_num_seqs": 2}):
        llm = LLM(model=str(folder), dtype="float32", **kwargs)
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, params, use_tqdm=False)[0]
        assert out.prompt_token_ids == ids
        ours = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]
        theirs = reference[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(ours), theirs, atol=2e-5), (torch.tensor(ours) - theirs).abs().max()
    triton = LLM(model=str(folder), dtype="float32", attention_backend="triton")
    with pytest.raises(ValidationError, match="only attention_backend='torch'"):
        triton.generate({"prompt": text, "multi_modal_data": {"image": images}}, params, use_tqdm=False)


@pytest.mark.parametrize("arch", sorted(TOKEN_ID_FAMILIES))
def test_families_checked_with_token_id_prompts(tmp_path, arch):
    """Qwen2-VL / Qwen2.5-VL (image tokens take 3-axis rotary positions from the model's own get_rope_index, later
    tokens a shifted one), SmolVLM, Mistral 3 and Pixtral (rows of [IMG] with break tokens; Mistral 3 resizes to
    whole merged patches), whose processors need torchvision: prompts as token ids with the
    placeholders expanded, served by the image processor alone. One and two images, a text-only prompt, and small
    steps, against Transformers' generate() with the same ids and image processor outputs; every prompt and output
    logprob too (positions move this tiny model's logits by ~1e-3, too little to change greedy tokens)."""
    make, prompt_of = TOKEN_ID_FAMILIES[arch]
    model, image_processor, tokenizer, folder = make(tmp_path / "model")
    a, b = draw_image(1, (60, 44)), draw_image(2, (40, 70))
    cases = [["Look at ", a, " and say"], ["Compare ", a, " with ", b, " now"], ["Once upon a time"]]
    prompts, expected, references = [], [], []
    for parts in cases:
        prompt, greedy, inputs = token_id_case(model, image_processor, tokenizer, prompt_of, parts, MAX_TOKENS)
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        with torch.no_grad():
            references.append(torch.log_softmax(model(input_ids=torch.tensor([ids]), **inputs).logits[0], dim=-1))
        prompts.append(prompt)
        expected.append(greedy)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0, prompt_logprobs=0)
    for kwargs in ({}, {"max_num_batched_tokens": 8, "max_num_seqs": 3}):
        llm = LLM(model=str(folder), dtype="float32", **kwargs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        check(outs, expected)
        for out, reference, (tokens, logits) in zip(outs, references, expected):
            ids = out.prompt_token_ids
            ours = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]
            theirs = reference[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            assert torch.allclose(torch.tensor(ours), theirs, atol=2e-5), (torch.tensor(ours) - theirs).abs().max()
            generated = [entry[token].logprob for entry, token in zip(out.outputs[0].logprobs, tokens)]
            theirs = [torch.log_softmax(step, dim=-1)[token].item() for step, token in zip(logits, tokens)]
            assert generated == pytest.approx(theirs, abs=2e-5)
    with pytest.raises(ValidationError, match="send prompt_token_ids with each image's placeholder tokens expanded"):
        llm.generate({"prompt": "x", "multi_modal_data": {"image": a}}, GREEDY, use_tqdm=False)


def test_prefix_cache_keys_on_the_image_and_encoder_runs_once(llava):
    """Same text, another image: no K/V reuse past the image (the answer is the new image's); same image again:
    a prefix-cache hit, and the vision encoder is not run again."""
    model, processor, image, folder = llava
    text = "<|im_start|>user\nA long shared preamble about the picture that follows here " + image + " ok"
    a, b = draw_image(4), draw_image(5)
    llm = LLM(model=str(folder), dtype="float32", block_size=4)
    calls = []
    llm.apply_model(lambda m: setattr(m, "encode_image", _counting(m.encode_image, calls)))
    for img in (a, b, a):
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)
        check(out, [hf_greedy_with_images(model, processor, text, [img])])
        last = out[0]
    assert last.num_cached_tokens >= len(last.prompt_token_ids) - 4  # all but the last block
    assert len(calls) == 2  # a, b; a's rows came from the encoder cache


def _counting(fn, calls):
    def wrapped(inputs):
        calls.append(1)
        return fn(inputs)
    return wrapped


def _data_url(image, kind="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_with_image_parts_equals_transformers(llava):
    """LLM.chat with an image_pil part and an image_url data URL: the processor's chat template places them."""
    model, processor, _, folder = llava
    a, b = draw_image(6), draw_image(7)
    conversation = [{"role": "user", "content": [
        {"type": "text", "text": "Look: "}, {"type": "image_pil", "image_pil": a},
        {"type": "text", "text": " and "}, {"type": "image_url", "image_url": {"url": _data_url(b)}},
        {"type": "text", "text": " which?"}]}]
    hf_messages = [{"role": "user", "content": [
        {"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
        {"type": "text", "text": " which?"}]}]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    expected = hf_greedy_with_images(model, processor, text, [a, b], add_special_tokens=False)
    llm = LLM(model=str(folder), dtype="float32")
    check(llm.chat(conversation, GREEDY, use_tqdm=False), [expected])


def test_bad_image_inputs_are_refused_with_the_reason(llava, tiny_llama, tmp_path):
    _, _, image, folder = llava
    llm = LLM(model=str(folder), dtype="float32", limit_mm_per_prompt={"image": 1})
    cases = [
        ({"prompt": f"{image}{image}", "multi_modal_data": {"image": [draw_image(1), draw_image(2)]}},
         "more than the limit of 1"),
        ({"prompt": f"x {image}", "multi_modal_data": {"image": "not an image"}}, "PIL.Image"),
        ({"prompt": "no placeholder", "multi_modal_data": {"image": draw_image(1)}}, "could not pair"),
        ({"prompt": f"x {image}", "multi_modal_data": {"video": [draw_image(1)]}}, "video"),
    ]
    for prompt, message in cases:
        with pytest.raises(ValidationError, match=message):
            llm.generate(prompt, GREEDY, use_tqdm=False)
    for url, message in [("data:text/plain;base64,aGk=", "must hold an image"),
                         ("data:image/png;base64,@@@", "not valid base64"),
                         ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "could not be decoded"),
                         (_bomb_url(), "more than the limit"),
                         ("file:///etc/hostname", "allowed-local-media-path"),
                         ("ftp://example.com/x.png", "unsupported image URL scheme")]:
        conversation = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with pytest.raises(ValidationError, match=message):
            llm.chat(conversation, GREEDY, use_tqdm=False)
    # token ids whose placeholders do not match the image: that request fails, the one beside it is served
    ids = [5, 6, model_image_token(llm)] * 2
    good = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValidationError, match="2 image placeholder tokens"):
        llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": draw_image(1)}}], GREEDY, use_tqdm=False)
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids == good
    text_only = LLM(model=str(tiny_llama[1]), dtype="float32")
    with pytest.raises(ValidationError, match="multi_modal_data"):
        text_only.generate({"prompt": "x", "multi_modal_data": {"image": draw_image(1)}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValidationError, match="takes no images"):
        text_only.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": draw_image(1)}]}], GREEDY)


def model_image_token(llm):
    return llm.llm_engine.mm_processor.image_token_id


def _bomb_url():
    """A small PNG whose header says 9000 x 9000 pixels: refused from the header, never decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_vlm_whose_processor_cannot_load_serves_text_and_refuses_images(tmp_path):
    """A LLaVA folder without its processor files (as a Pixtral one is here, where its processor needs torchvision):
    text equals Transformers, an image is refused with the reason instead of failing the start."""
    from greedy import hf_greedy
    from tiny_models import build_tokenizer

    model, _, image, folder = make_tiny_vlm("LlavaForConditionalGeneration", tmp_path / "full")
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    build_tokenizer().save_pretrained(bare)
    llm = LLM(model=str(bare), dtype="float32")
    prompt = [7, 30, 12, 60, 21]
    tokens, logits = hf_greedy(model, prompt, MAX_TOKENS)
    out = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    assert_greedy_match(list(out[0].outputs[0].token_ids), tokens, logits)
    with pytest.raises(ValidationError, match="processor .AutoProcessor. could not be loaded"):
        llm.generate({"prompt": f"a {image}", "multi_modal_data": {"image": draw_image(1)}}, GREEDY)
    assert re.search(r"\nimages +refused: its processor \(AutoProcessor\) could not be loaded",
                     check_model(str(bare)).render())


def test_check_says_whether_images_are_served(llava):
    assert re.search(r"\nimages +served \(LlavaProcessor places them\)", check_model(str(llava[3])).render())


def test_families_that_need_more_refuse_images_with_the_reason(tmp_path):
    """PaliGemma (a prefix that attends both ways), Qwen3-VL (M-RoPE positions not computed for it yet) and families
    not checked here serve text; their images are refused."""
    from hfbridge.multimodal.processor import image_refusal

    paligemma = transformers.PaliGemmaConfig(architectures=["PaliGemmaForConditionalGeneration"])
    qwen3_vl = transformers.Qwen3VLConfig(architectures=["Qwen3VLForConditionalGeneration"])
    llava = transformers.LlavaConfig(architectures=["LlavaForConditionalGeneration"])
    assert "both directions" in image_refusal(paligemma)
    assert "M-RoPE" in image_refusal(qwen3_vl)
    assert image_refusal(llava) is None
    # a family whose image path is not checked here (Fuyu feeds image patches, not encoder rows) is refused
    assert "has not checked fuyu images" in image_refusal(transformers.FuyuConfig(architectures=["FuyuForCausalLM"]))
    assert TIE_TOLERANCE  # the tie rule above is the only tolerance these tests allow
