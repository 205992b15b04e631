"""What a tensor-parallel step costs the driver: bytes sent to the ranks and received back, and the wall time of
a decode step, at tp=2 over mp workers (float32, eager, greedy), on a SmolLM2-135M-shaped model with random
weights (SmolLM2's 9 query / 3 KV heads do not split in two: 8 / 2 here, same hidden size, layers, MLP and
vocabulary) saved once in a temporary folder.

    python benchmarks/tp_step.py                      # 64 requests, 128-token prompts, 16 new tokens
    python benchmarks/tp_step.py --vocab 151936       # a Qwen2.5-sized vocabulary: bigger logits
    python benchmarks/tp_step.py --model PATH --batch 16

Bytes are what the driver pickles per step (every rank's message) and the output rank's reply, counted by
wrapping the executor's send and receive; time is the engine's step() wall time over the decode steps (every
request one token), mean and median. Not a test: it prints a table.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: a SmolLM2-135M-shaped random model")
    parser.add_argument("--vocab", type=int, default=49152, help="the random model's vocabulary")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()

    from hfbridge import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as folder:
        model = args.model or smollm2_shaped(folder, args.vocab)
        llm = LLM(model=model, tensor_parallel_size=args.tp, enforce_eager=True, dtype="float32",
                  max_model_len=args.input_len + args.output_len + 8, max_num_seqs=args.batch,
                  skip_tokenizer_init=args.model is None)
        run(llm, args)


def smollm2_shaped(folder: str, vocab_size: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def run(llm, args) -> None:
    from hfbridge import SamplingParams

    engine = llm.llm_engine
    executor = engine.executor
    sent, received = [0], [0]
    send, recv = executor._send_all, executor._recv

    def counted_send(message):
        sent[0] += (len(message) if isinstance(message, bytes) else len(pickle.dumps(message))) * executor.world_size
        return send(message)

    def counted_recv(rank, *a, **k):
        reply = recv(rank, *a, **k)
        received[0] += len(pickle.dumps(reply))
        return reply

    executor._send_all, executor._recv = counted_send, counted_recv
    rng = random.Random(0)
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), {"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(args.input_len)]},
                           params)
    decode_times, decode_sent, decode_received = [], [], []
    while engine.has_unfinished_requests():
        before_sent, before_received = sent[0], received[0]
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        running = engine.scheduler.running
        if running and all(r.num_output_tokens > 1 for r in running) and len(running) == args.batch:
            decode_times.append(elapsed)
            decode_sent.append(sent[0] - before_sent)
            decode_received.append(received[0] - before_received)
    llm.llm_engine.shutdown()
    print(f"tp={args.tp}, {args.batch} requests x ({args.input_len} prompt + {args.output_len} new tokens), "
          f"vocabulary {vocab}, {len(decode_times)} decode steps")
    print(f"  sent to the ranks per decode step:   {statistics.mean(decode_sent) / 1024:10.1f} KiB")
    print(f"  received from the output rank:       {statistics.mean(decode_received) / 1024:10.1f} KiB")
    print(f"  decode step wall time:               {statistics.mean(decode_times) * 1000:10.1f} ms mean, "
          f"{statistics.median(decode_times) * 1000:.1f} ms median")


if __name__ == "__main__":
    main()
