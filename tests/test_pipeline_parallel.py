"""Pipeline parallelism (issue 11): pp=2 (and tp=2 x pp=2) over gloo on CPU gives the greedy tokens of the model's
own forward and its top-5 logprobs (1e-4, float32), for tiny Llama, Gemma2 with tied embeddings (the embedding lives
on the first and the last stage) and the remote-code model with its own plan; stages split by vLLM's rule, or by
HFBRIDGE_PP_LAYER_PARTITION with VLLM_PP_LAYER_PARTITION's semantics; bad plans and partitions are refused before
any worker starts; workers never outlive the engine. Each pp=2 engine spawns 2 workers (~10 s on a contended box)."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import transformers
from greedy import assert_greedy_match
from test_custom_model import write_remote_code_model
from test_tensor_parallel import free_port
from tiny_models import CONFIGS, build_model, build_tokenizer, save_model
from torch import nn

from hfbridge import LLM, SamplingParams
from hfbridge.parallel.pp_plan import (
    PARTITION_ENV,
    MissingLayer,
    PPPlanError,
    check_pp_plan,
    split_stages,
    stage_layer_range,
)
from hfbridge.parallel.state import PPGroup

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
TEXTS = ["Hello, my name is", "The capital of France is Paris. The capital of Italy is"]


@pytest.fixture(scope="module")
def prompts():
    tok = build_tokenizer()
    return [tok(t).input_ids for t in TEXTS]


def forward_greedy(model, prompt: list[int], num_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """The oracle: greedy decoding by full recomputation with the model's own forward; logits of each step."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits.append(model(torch.tensor([ids])).logits[0, -1].float())
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], logits


def assert_matches_model(model, prompts, outputs) -> None:
    """Greedy ids equal the model's own (a documented top-2 float tie aside); each step's top-5 logprobs equal the
    log-softmax of its logits within 1e-4, up to the first difference."""
    for prompt, out in zip(prompts, outputs):
        ours = out.outputs[0]
        tokens, logits = forward_greedy(model, prompt, MAX_NEW)
        assert_greedy_match(ours.token_ids, tokens, logits)
        for a, b, step_logits, step in zip(ours.token_ids, tokens, logits, ours.logprobs):
            if a != b:
                break
            top = torch.log_softmax(step_logits, dim=-1).topk(5)
            expected = dict(zip(top.indices.tolist(), top.values.tolist()))
            assert step.keys() == expected.keys()
            assert all(abs(step[t].logprob - expected[t]) < 1e-4 for t in step)


def run(folder, prompts, **kwargs):
    llm = LLM(model=str(folder), max_model_len=64, block_size=4, **kwargs)
    return llm, llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)


def layer_kinds(llm) -> list[list[str]]:
    """Per rank, the class of each decoder layer it holds (MissingLayer where another stage runs it)."""
    return llm.apply_model(lambda m: [type(layer).__name__ for layer in m.model.base_model.layers])


def cache_layers(model) -> list[int]:
    """The layers whose KV cache a rank allocates: those its attention calls reach (run on every rank at once)."""
    from hfbridge.worker.layer_probe import probe_attention_layers

    return sorted(probe_attention_layers(model, torch.device("cpu")))


def head_parameters(model) -> list[str]:
    return sorted(name for name, _ in model.named_parameters() if "lm_head" in name)


def break_first_stage(model) -> None:
    layers = model.model.base_model.layers
    if not isinstance(layers[0], MissingLayer):  # stage 0 only: the last stage then waits on its hand-off

        def boom(*args, **kwargs):
            raise RuntimeError("boom on the first stage")

        layers[0].forward = boom


def assert_workers_gone(llm) -> None:
    pids = [p.pid for p in llm.llm_engine.executor.processes]
    llm.llm_engine.shutdown()
    gc.collect()
    assert not psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)[1]


# ---- the split rule, against vLLM's own test goldens (tests/distributed/test_pipeline_partition.py) ------------

@pytest.mark.parametrize(
    "num_layers, pp, stage, indices",
    [(2, 2, 0, (0, 1)), (2, 2, 1, (1, 2)), (3, 2, 0, (0, 2)), (3, 2, 1, (2, 3)), (3, 3, 0, (0, 1)),
     (3, 3, 1, (1, 2)), (3, 3, 2, (2, 3)), (4, 3, 0, (0, 1)), (4, 3, 1, (1, 3)), (4, 3, 2, (3, 4)),
     (5, 3, 0, (0, 2)), (5, 3, 1, (2, 4)), (5, 3, 2, (4, 5))],
)
def test_even_split_is_vllms(monkeypatch, num_layers, pp, stage, indices):
    monkeypatch.delenv(PARTITION_ENV, raising=False)
    assert stage_layer_range(num_layers, stage, pp) == indices


def test_partition_env_is_vllms(monkeypatch):
    for text, num_layers, expected in [("5,5,5,5", 20, [(0, 5), (5, 10), (10, 15), (15, 20)]),
                                       ("4,6,6,4", 20, [(0, 4), (4, 10), (10, 16), (16, 20)]),
                                       ("5,6,5,6", 22, [(0, 5), (5, 11), (11, 16), (16, 22)])]:
        monkeypatch.setenv(PARTITION_ENV, text)
        assert [stage_layer_range(num_layers, s, 4) for s in range(4)] == expected
    for text, message in [("5,5,5,5,", "is not a comma-separated list"), ("5,5,5,a", "is not a comma-separated list"),
                          ("5,5,5", "names 3 stages but pipeline_parallel_size=4"),
                          ("5,5,5,6", "sums to 21 layers but the model has 20")]:
        monkeypatch.setenv(PARTITION_ENV, text)
        with pytest.raises(PPPlanError, match=f"{PARTITION_ENV}={text!r} {message}"):
            stage_layer_range(20, 0, 4)


# ---- the plan: one ModuleList, found by attribute path ------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, scale: float, return_tuple: bool):
        super().__init__()
        self.scale, self.return_tuple = scale, return_tuple

    def forward(self, hidden_states):
        out = hidden_states * self.scale + 1
        return (out, None) if self.return_tuple else out


class Inner(nn.Module):
    def __init__(self, return_tuple: bool):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(Block(i + 2.0, return_tuple) for i in range(3))
        self.norm = nn.LayerNorm(4)


class NewStyle(nn.Module):
    """Layers return the hidden states (Transformers 5); the plan's ModuleList is nested: `text_model.layers`."""

    _pp_plan = {"text_model.embed": None, "text_model.layers": None, "text_model.norm": None}

    def __init__(self):
        super().__init__()
        self.text_model = Inner(return_tuple=False)

    def forward(self, input_ids=None, inputs_embeds=None):
        hidden_states = self.text_model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.text_model.layers:
            hidden_states = layer(hidden_states)
        return self.text_model.norm(hidden_states)


class OldStyle(NewStyle):
    """Layers return tuples and the loop reads `[0]` (older Transformers, much remote code)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.text_model = Inner(return_tuple=True)

    def forward(self, input_ids=None, inputs_embeds=None):
        hidden_states = self.text_model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.text_model.layers:
            layer_outputs = layer(hidden_states)
            hidden_states = layer_outputs[0]
        return self.text_model.norm(hidden_states)


@pytest.mark.parametrize("cls", [NewStyle, OldStyle])
def test_nested_plan_splits_and_stages_compose(monkeypatch, cls):
    """Stage 0 then stage 1 of the split model compute what the whole model computes (3 layers: 2 + 1)."""
    monkeypatch.delenv(PARTITION_ENV, raising=False)
    torch.manual_seed(0)
    whole = cls()
    ids = torch.tensor([[1, 2, 3]])
    expected = whole(ids)
    stages = [cls() for _ in range(2)]
    for stage, model in enumerate(stages):
        model.load_state_dict(whole.state_dict())
        split_stages(model, [], None, PPGroup(stage, 2), tied_embeddings=False)
    first, last = stages
    assert [type(m).__name__ for m in first.text_model.layers] == ["Block", "Block", "MissingLayer"]
    assert [type(m).__name__ for m in last.text_model.layers] == ["MissingLayer", "MissingLayer", "Block"]
    assert isinstance(first.text_model.norm, MissingLayer) and isinstance(last.text_model.embed, MissingLayer)
    torch.testing.assert_close(last(inputs_embeds=first(ids)), expected)


def test_plans_without_exactly_one_module_list_are_refused():
    model = NewStyle()
    model._pp_plan = {"text_model.embed": None, "text_model.norm": None}
    with pytest.raises(PPPlanError, match=r"exactly one nn.ModuleList.*names 0: \{'text_model.embed': 'Embedding', "
                                          r"'text_model.norm': 'LayerNorm'\}.*base_model_pp_plan"):
        check_pp_plan(model, None, 2)
    model.extra = nn.ModuleList([nn.Linear(2, 2)])
    model._pp_plan = {"text_model.embed": None, "text_model.layers": None, "extra": None}
    with pytest.raises(PPPlanError, match=r"names 2: .*'text_model.layers': 'ModuleList'.*'extra': 'ModuleList'"):
        check_pp_plan(model, None, 2)


# ---- refusals through LLM(), before any worker starts (the folders hold no weights) -----------------------------

def weightless(tmp_path, config):
    folder = tmp_path / "weightless"
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_llm_refuses_before_loading(tmp_path, monkeypatch):
    gpt2 = weightless(tmp_path / "gpt2", CONFIGS["GPT2LMHeadModel"]())
    with pytest.raises(ValueError, match=r"GPT2Model has no base_model_pp_plan.*hf_overrides=\{\"base_model_pp_plan\""):
        LLM(model=str(gpt2), max_model_len=64, pipeline_parallel_size=2)
    llama = weightless(tmp_path / "llama", CONFIGS["LlamaForCausalLM"]())

    def without_layers(config):  # a callable override replaces the plan (a dict one merges into it, as in vLLM)
        config.base_model_pp_plan = {"embed_tokens": (["input_ids"], ["inputs_embeds"]),
                                     "norm": (["hidden_states"], ["hidden_states"])}
        return config

    with pytest.raises(ValueError, match=r"LlamaModel must name exactly one nn.ModuleList.*names 0"):
        LLM(model=str(llama), max_model_len=64, pipeline_parallel_size=2, hf_overrides=without_layers)
    monkeypatch.setenv(PARTITION_ENV, "1,2")
    with pytest.raises(ValueError, match=rf"{PARTITION_ENV}='1,2' sums to 3 layers but the model has 2"):
        LLM(model=str(llama), max_model_len=64, pipeline_parallel_size=2)


POSITIONS_OUTSIDE_THE_PLAN = (  # learned positions added after embed_tokens, in the base forward the plan splits
    ("        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n",
     "        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)\n"
     "        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)\n"),
    ("        mask = create_causal_mask(",
     "        hidden_states = hidden_states + self.embed_positions(position_ids)\n        mask = create_causal_mask("),
)


def test_a_split_that_would_change_the_output_is_refused_before_loading(tmp_path):
    """The model runs at pp=1 (its positions added once); at pp=2 the second stage would add them again: refused,
    naming the reason and the fix, before any worker starts."""
    write_remote_code_model(tmp_path / "positions", edits=POSITIONS_OUTSIDE_THE_PLAN)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2 would change MyModel's output.*base_model_pp_plan"):
        LLM(model=str(tmp_path / "positions"), trust_remote_code=True, max_model_len=64, pipeline_parallel_size=2)
    llm = LLM(model=str(tmp_path / "positions"), trust_remote_code=True, max_model_len=64)
    assert llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


# ---- equality with the model's own forward -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 3-layer Llama: its even split is 2 + 1 layers."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**CONFIGS["LlamaForCausalLM"]().to_dict(), "num_hidden_layers": 3})
    model = transformers.LlamaForCausalLM(config).eval()
    return model, save_model(model, tmp_path_factory.mktemp("pp_llama"))


def test_llama_pp2_uneven_partition_matches_transformers(llama, prompts, monkeypatch):
    model, folder = llama
    monkeypatch.setenv(PARTITION_ENV, "1,2")  # the even split would be 2,1; spawned workers inherit it
    llm, outputs = run(folder, prompts, pipeline_parallel_size=2)
    assert_matches_model(model, prompts, outputs)
    assert layer_kinds(llm) == [["LlamaDecoderLayer", "MissingLayer", "MissingLayer"],
                                ["MissingLayer", "LlamaDecoderLayer", "LlamaDecoderLayer"]]
    assert llm.apply_model(cache_layers) == [[0], [1, 2]]  # each stage's KV cache covers its own layers only
    assert llm.apply_model(head_parameters) == [[], ["model.lm_head.weight"]]  # the head lives on the last stage
    assert_workers_gone(llm)


def test_llama_tp2_x_pp2_matches_transformers(llama, prompts, monkeypatch):
    model, folder = llama
    monkeypatch.delenv(PARTITION_ENV, raising=False)
    llm, outputs = run(folder, prompts, pipeline_parallel_size=2, tensor_parallel_size=2)
    assert_matches_model(model, prompts, outputs)
    # ranks 0, 1 are stage 0's TP group (layers 0-1), ranks 2, 3 stage 1's (layer 2): each holds half a q_proj
    shapes = llm.apply_model(lambda m: [tuple(layer.self_attn.q_proj.weight.shape)
                                        for layer in m.model.base_model.layers if not isinstance(layer, MissingLayer)])
    assert shapes == [[(32, 64)] * 2] * 2 + [[(32, 64)]] * 2
    assert llm.apply_model(cache_layers) == [[0, 1]] * 2 + [[2]] * 2
    assert_workers_gone(llm)


def test_external_launcher_under_torchrun(llama, prompts, tmp_path):
    """Two torchrun ranks, one stage each: both produce the model's own tokens (every rank samples the last
    stage's broadcast logits)."""
    model, folder = llama
    script = Path(__file__).parent / "tp_launcher_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent),
           "HFBRIDGE_TEST_PARALLEL": json.dumps({"pipeline_parallel_size": 2})}
    env.pop(PARTITION_ENV, None)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         str(script), str(folder), json.dumps(prompts), str(tmp_path), str(MAX_NEW)],
        env=env, check=True, timeout=180, cwd=tmp_path,
    )
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        outputs = [
            SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=g["ids"],
                logprobs=[{int(t): SimpleNamespace(logprob=v) for t, v in step.items()} for step in g["logprobs"]],
            )])
            for g in got
        ]
        assert_matches_model(model, prompts, outputs)


def test_gemma2_tied_embeddings_pp2_matches_transformers(tmp_path, prompts):
    model = build_model("Gemma2ForCausalLM")
    assert model.config.tie_word_embeddings
    llm, outputs = run(save_model(model, tmp_path / "gemma2"), prompts, pipeline_parallel_size=2)
    assert_matches_model(model, prompts, outputs)
    # the embedding lives on both stages (the last one's head reads it); the head only on the last
    held = llm.apply_model(lambda m: (type(m.model.model.embed_tokens).__name__, type(m.model.lm_head).__name__,
                                      m.model.lm_head.weight is m.model.model.embed_tokens.weight
                                      if isinstance(m.model.lm_head, nn.Linear) else None))
    assert held == [("Gemma2TextScaledWordEmbedding", "MissingLayer", None),
                    ("Gemma2TextScaledWordEmbedding", "Linear", True)]
    assert_workers_gone(llm)


def test_remote_code_model_with_its_own_plan_pp2(tmp_path, prompts):
    model = write_remote_code_model(tmp_path / "my_model")
    llm, outputs = run(tmp_path / "my_model", prompts, trust_remote_code=True, pipeline_parallel_size=2)
    assert_matches_model(model, prompts, outputs)
    assert layer_kinds(llm) == [["MyLayer", "MissingLayer"], ["MissingLayer", "MyLayer"]]
    # a failing first stage: its own error reaches the caller at once (the last stage is blocked, not failing)
    llm.apply_model(break_first_stage)
    with pytest.raises(Exception, match="boom on the first stage"):
        llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)
    assert_workers_gone(llm)
