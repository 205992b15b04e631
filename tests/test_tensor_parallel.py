"""Tensor parallelism (issue 10): tp=2 over gloo on CPU gives the tokens Transformers' generate() gives and the
top-5 logprobs of tp=1 (1e-4, float32); each rank holds 1/tp of every sharded module; every style the installed
Transformers' configs use is either built or refused by name; bad plans are refused before any weight is read;
workers never outlive the engine. Each tp=2 engine spawns 2 workers (~10 s each on a contended 2-core box)."""
from __future__ import annotations

import ast
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import transformers
from greedy import assert_greedy_match, hf_greedy
from test_custom_model import write_remote_code_model
from tiny_models import build_tokenizer, make_tiny_model, save_model, CONFIGS

from hfbridge import LLM, SamplingParams, StructuredOutputsParams
from hfbridge.parallel.styles import REFUSED, STYLES
from hfbridge.parallel.tp_plan import tp_plan_of, _pattern

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
TEXTS = ["Hello, my name is", "The capital of France is Paris. The capital of Italy is", "A quick brown fox"]


@pytest.fixture(scope="module")
def prompts():
    tok = build_tokenizer()
    return [tok(t).input_ids for t in TEXTS]


def run(folder, prompts, **kwargs):
    llm = LLM(model=str(folder), max_model_len=64, block_size=4, **kwargs)
    return llm, llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)


def assert_same_outputs(ours, reference) -> None:
    """Same greedy ids; each step's top-5 logprobs equal within 1e-4 (float32)."""
    for a, b in zip(ours, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-4


def worker_pids(llm) -> list[int]:
    return [p.pid for p in llm.llm_engine.executor.processes]


# ---- the style table against the installed Transformers ------------------------------------------------------

def installed_plan_styles() -> dict[str, int]:
    """Every style in every `base_model_tp_plan = {...}` literal of Transformers' config sources, counted."""
    counts: dict[str, int] = {}
    root = Path(transformers.__file__).parent / "models"
    for path in root.glob("*/configuration_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(getattr(t, "id", None) == "base_model_tp_plan" for t in targets):
                    for value in node.value.values:
                        value = value.value if isinstance(value, ast.DictComp) else value  # **{f"{stack}...": style}
                        style = value.value if isinstance(value, ast.Constant) else repr(ast.unparse(value))
                        counts[style] = counts.get(style, 0) + 1
    return counts


def test_every_installed_style_is_built_or_refused_by_name():
    counts = installed_plan_styles()
    assert counts.get("colwise", 0) > 100 and counts.get("rowwise", 0) > 100  # the scan found the plans
    unknown = sorted(set(counts) - set(STYLES) - set(REFUSED))
    assert not unknown, f"Transformers {transformers.__version__} uses styles hfbridge does not list: {unknown}"


# ---- refusals, before any weight is read (the folders hold no weights at all) ----------------------------------

def weightless(tmp_path, config) -> Path:
    folder = tmp_path / "weightless"
    folder.mkdir()
    config.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "arch, overrides, message",
    [
        ("LlamaForCausalLM", {"base_model_tp_plan": {"layers.*.self_attn.q_proj": "sideways"}},
         r"layers\.\*\.self_attn\.q_proj.*'sideways'.*base_model_tp_plan"),
        ("LlamaForCausalLM", {"base_model_tp_plan": {"layers.*.self_attn.q_proj": ["colwise"]}},
         r"layers\.\*\.self_attn\.q_proj.*\['colwise'\].*base_model_tp_plan"),
        ("GPT2LMHeadModel", None, r"GPT2LMHeadModel has no base_model_tp_plan.*hf_overrides=\{\"base_model_tp_plan\""),
        ("LlamaForCausalLM", {"num_attention_heads": 3, "num_key_value_heads": 3},
         r"num_attention_heads=3 is not divisible by tensor_parallel_size=2"),
    ],
    ids=["unknown-style", "non-string-style", "no-plan", "heads"],
)
def test_bad_plans_are_refused_before_loading(tmp_path, arch, overrides, message):
    folder = weightless(tmp_path, CONFIGS[arch]())
    with pytest.raises(ValueError, match=message):
        LLM(model=str(folder), max_model_len=64, tensor_parallel_size=2, hf_overrides=overrides)


def test_unknown_backend_is_refused():  # ray without Ray installed: tests/test_ray_executor.py
    with pytest.raises(ValueError, match=r"distributed_executor_backend='threads' is not one of"):
        LLM(model="unused", tensor_parallel_size=2, distributed_executor_backend="threads")


# ---- equality at tp=2 with the mp backend ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory, prompts):
    model, folder = make_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("tp_llama"))
    # tp=1 on the Transformers path (auto would pick the native Llama): the same modules, so bytes compare by name
    llm1, reference = run(folder, prompts, model_impl="transformers")
    llm2, outputs = run(folder, prompts, tensor_parallel_size=2)
    yield model, llm1, reference, llm2, outputs
    llm2.llm_engine.shutdown()


def test_llama_tp2_equals_transformers_and_tp1(llama, prompts):
    model, _, reference, _, outputs = llama
    assert_same_outputs(outputs, reference)
    for prompt, out in zip(prompts, outputs):
        tokens, logits = hf_greedy(model, prompt, MAX_NEW, ignore_eos=True)
        assert_greedy_match(out.outputs[0].token_ids, tokens, logits)


def test_llama_tp2_mixed_batch_equals_tp1(llama, prompts):
    """One batch of every kind of row the output rank returns differently (argmax-only greedy rows reduced to a
    token, seeded sampling, prompt logprobs, a structured choice): the tokens and logprobs of tp=1."""
    _, llm1, _, llm2, _ = llama
    params = [SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, prompt_logprobs=3),
              SamplingParams(temperature=0, max_tokens=MAX_NEW,
                             structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))]
    batch = [{"prompt_token_ids": p} for p in prompts + prompts[:1]]
    ours, reference = (llm.generate(batch, params, use_tqdm=False) for llm in (llm2, llm1))
    for a, b in zip(ours, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for steps_a, steps_b in ((a.outputs[0].logprobs or [], b.outputs[0].logprobs or []),
                                 (a.prompt_logprobs or [], b.prompt_logprobs or [])):
            assert len(steps_a) == len(steps_b)
            for step_a, step_b in zip(steps_a, steps_b):
                assert (step_a is None) == (step_b is None)
                for token in step_a or {}:
                    assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-4
    assert ours[2].prompt_logprobs and ours[3].outputs[0].text in ("yes", "no")


def _parameter_bytes(model):
    return {name: p.numel() * p.element_size() for name, p in model.named_parameters()}


def test_each_rank_holds_half_of_every_sharded_module(llama):
    _, llm1, _, llm2, _ = llama
    [full] = llm1.apply_model(_parameter_bytes)
    ranks = llm2.apply_model(_parameter_bytes)
    assert len(ranks) == 2
    plan = llm1.apply_model(lambda m: tp_plan_of(m))[0]
    sharded = [_pattern(k) for k, style in plan.items() if style not in ("replicate", "replicated_with_grad_allreduce")]
    assert sharded
    num_sharded = 0
    for name, size in full.items():
        is_sharded = any(p.match(name.rpartition(".")[0]) for p in sharded)
        num_sharded += is_sharded
        for rank in ranks:
            assert rank[name] == (size // 2 if is_sharded else size), name
    assert num_sharded >= 7 * 2  # q k v o gate up down in both layers (+ embedding and head)


def _qwen2_one_kv_head():
    return CONFIGS["Qwen2ForCausalLM"]().__class__(**{**CONFIGS["Qwen2ForCausalLM"]().to_dict(), "num_key_value_heads": 1})


@pytest.mark.parametrize("arch", ["Qwen2-kv1", "Gemma2ForCausalLM", "Qwen3MoeForCausalLM"])
def test_more_architectures_tp2_equal_tp1(tmp_path, prompts, arch):
    if arch == "Qwen2-kv1":  # tp > num_key_value_heads: the one KV head is replicated on both ranks
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(_qwen2_one_kv_head()).eval()
        folder = save_model(model, tmp_path / arch)
    else:
        folder = make_tiny_model(arch, tmp_path / arch)[1]
    _, reference = run(folder, prompts)
    llm, outputs = run(folder, prompts, tensor_parallel_size=2)
    assert_same_outputs(outputs, reference)
    pids = worker_pids(llm)
    del llm  # the workers go with the engine: no orphans
    gc.collect()
    assert not psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)[1]


def test_remote_code_model_with_its_own_plan(tmp_path, prompts):
    write_remote_code_model(tmp_path / "my_model")
    folder = tmp_path / "my_model"
    _, reference = run(folder, prompts, trust_remote_code=True)
    llm, outputs = run(folder, prompts, trust_remote_code=True, tensor_parallel_size=2)
    assert_same_outputs(outputs, reference)
    shapes = llm.apply_model(lambda m: [tuple(m.model.model.layers[0].attn.q_proj.weight.shape),
                                        tuple(m.model.model.layers[0].mlp[2].weight.shape)])
    assert shapes == [[(32, 64), (64, 64)]] * 2  # q_proj [64, 64] by rows, the MLP's out [64, 128] by columns
    llm.llm_engine.shutdown()


# ---- external_launcher under torchrun ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_external_launcher_under_torchrun(tmp_path, llama, prompts):
    model, _, reference, _, _ = llama
    folder = save_model(model, tmp_path / "model")
    script = Path(__file__).parent / "tp_launcher_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         str(script), str(folder), json.dumps(prompts), str(tmp_path)],
        env=env, check=True, timeout=180, cwd=tmp_path,
    )
    expected = [
        {"ids": o.outputs[0].token_ids,
         "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
        for o in reference
    ]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for g, e in zip(got, expected):
            assert g["ids"] == e["ids"]
            for gs, es in zip(g["logprobs"], e["logprobs"]):
                assert gs.keys() == es.keys()
                assert all(abs(gs[t] - es[t]) < 1e-4 for t in gs)


def test_a_dead_worker_raises_instead_of_hanging(llama, prompts):
    """Runs last on the shared tp=2 Llama engine: kill rank 1, the next step fails at once, the rest are stopped."""
    llm = llama[3]
    pids = worker_pids(llm)
    psutil.Process(pids[1]).kill()
    with pytest.raises(RuntimeError, match=r"tensor-parallel worker 1 exited"):
        llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)
    assert not psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)[1]


def test_a_flat_script_is_told_to_guard_its_main(tmp_path):
    """tensor_parallel_size=2 at the top level of a script: the spawned workers import it again; the error says
    what to write (multiprocessing's own message is about bootstrapping)."""
    _, folder = make_tiny_model("LlamaForCausalLM", tmp_path / "model")
    script = tmp_path / "flat_script.py"
    script.write_text("from hfbridge import LLM\n"
                      f"llm = LLM(model={str(folder)!r}, tensor_parallel_size=2, max_model_len=64)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HFBRIDGE_WORKER_TIMEOUT": "120"})
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr, result.stderr[-3000:]
