"""vLLM-compatible command-line spelling for click: `--foo_bar` as `--foo-bar`, `--api-key a b` (argparse's
nargs="+"), human-readable integers (`32k`), JSON dict flags, and vLLM flags that mean nothing here, which
are accepted with a one-line warning instead of failing a command copied from a vLLM recipe."""
from __future__ import annotations

import json
import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # imported inside engine_args_from: `hfbridge --help` must not pay for torch
    from hfbridge.engine.engine_args import EngineArgs

logger = logging.getLogger("hfbridge.entrypoints.cli")

# Flags whose value is a list (argparse nargs="+"): `--api-key a b` becomes `--api-key a --api-key b`.
LIST_FLAGS = frozenset({"--api-key", "--served-model-name", "--lora-modules", "--allowed-media-domains"})

# vLLM flags with no effect in hfbridge: name -> how many values follow (0 for switches, -1 for nargs="+").
IGNORED_FLAGS: dict[str, int] = {
    **dict.fromkeys(
        ["--disable-log-stats", "--disable-log-requests", "--enable-log-requests",
         "--disable-custom-all-reduce", "--enable-prompt-tokens-details",
         "--disable-frontend-multiprocessing", "--enable-sleep-mode",
         "--disable-uvicorn-access-log", "--enable-request-id-headers",
         "--use-v2-block-manager", "--enable-server-load-tracking",
         "--disable-fastapi-docs", "--disable-async-output-proc",
         "--trust-request-mm-kwargs", "--enable-log-outputs", "--disable-mm-preprocessor-cache",
         "--enable-expert-parallel", "--enable-eplb", "--async-scheduling"], 0),
    **dict.fromkeys(
        ["--swap-space", "--cpu-offload-gb", "--max-seq-len-to-capture",
         "--compilation-config", "--uvicorn-log-level", "--root-path",
         "--worker-cls",
         "--num-scheduler-steps", "--long-prefill-token-threshold", "--max-num-partial-prefills",
         "--preemption-mode", "--config-format", "--otlp-traces-endpoint",
         "--collect-detailed-traces", "--max-log-len", "--lora-dtype", "--tokenizer-pool-size",
         "--kv-transfer-config", "--disable-log-stats-interval", "--lora-extra-vocab-size",
         "--mm-encoder-tp-mode", "--api-server-count", "--prefix-caching-hash-algo",
         "--numa-bind", "--ignore-patterns"], 1),
}
# vLLM flags that would change what is computed: accepted with the values that change nothing here (vLLM's
# defaults), refused with the reason otherwise; never dropped with a warning. name -> (values accepted, reason).
# A switch (no value) lists no values: it is always refused.
OUTPUT_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "--kv-cache-dtype": (("auto",), "the KV cache keeps the model's dtype (auto)"),
    "--data-parallel-size": (("1",), "data parallelism is not supported; run one server per replica"),
    "--speculative-config": ((), "speculative decoding is not supported"),
    "--prompt-adapters": ((), "prompt adapters are not supported"),
    "--enable-prompt-embeds": ((), "prompt embeddings are not supported"),
    "--load-format": (("auto", "safetensors", "pt"), "weights load from the checkpoint's own files"),
    "--logits-processors": ((), "custom logits processors are not supported"),
    "--mm-processor-kwargs": (("{}",), "processor options are not supported yet: images are prepared with the "
                                       "processor's own settings"),
    "--hf-config-path": ((), "the config is read from the model folder; change it with --hf-overrides"),
    "--code-revision": ((), "remote code is read at --revision"),
    "--guided-decoding-backend": (("auto", "xgrammar"), "structured outputs are decoded with xgrammar"),
    "--structured-outputs-config": (('{"backend": "xgrammar"}', '{"backend": "auto"}'),
                                    "structured outputs use xgrammar with per-request options "
                                    "(disable_any_whitespace, ...); --reasoning-parser sets the reasoning format"),
    "--chat-template-content-format": (("auto",), "the server renders message content as the template expects "
                                                 "(auto)"),
    "--disable-sliding-window": ((), "sliding windows are part of the model; hfbridge always honours them"),
    "--return-tokens-as-token-ids": ((), "tokens are returned as text"),
}
# vLLM flags that would weaken or bypass security if ignored (an auth middleware not mounted, a socket not the
# one asked for): refused with the reason, never dropped with a warning.
REFUSED_FLAGS = {
    "--middleware": "hfbridge cannot mount ASGI middleware; use --api-key, or put a proxy in front",
    "--uds": "hfbridge listens on TCP only (--host/--port); a Unix socket is not supported yet",
    "--enable-ssl-refresh": "certificates are read once at start; restart the server to load new ones",
    "--ssl-ciphers": "hfbridge uses Python's default TLS ciphers; a cipher list is not supported yet",
}
# vLLM's short spellings; argparse accepts them, click sees them as clusters of one-letter flags.
SHORT_ALIASES = {"-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size", "-dp": "--data-parallel-size",
                 "-q": "--quantization", "-O": "--compilation-config"}


def normalize_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            out += argv[i - 1:]
            break
        if token in SHORT_ALIASES:
            token = SHORT_ALIASES[token]
        elif token.startswith("-O") and token[2:].isdigit():  # -O3: an optimisation level, attached
            token = f"--compilation-config={token[2:]}"
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        name = name.replace("_", "-")
        key = f"--{name[5:]}" if name.startswith("--no-") and f"--{name[5:]}" in IGNORED_FLAGS else name
        if key in REFUSED_FLAGS:
            raise click.UsageError(f"{name} is not supported: {REFUSED_FLAGS[key]}")
        if key in OUTPUT_FLAGS:
            accepted, reason = OUTPUT_FLAGS[key]
            if not eq and accepted and i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            if not accepted or value.replace(" ", "") not in {v.replace(" ", "") for v in accepted}:
                given = f"{name} {value}".strip() if accepted else name
                raise click.UsageError(f"{given} is not supported: {reason}"
                                       + (f" (accepted: {', '.join(accepted)})" if accepted else ""))
            continue
        if key in IGNORED_FLAGS:
            num_values = IGNORED_FLAGS[key]
            if not eq:  # skip the flag's values too: one, or all up to the next flag for list flags
                end = len(argv) if num_values < 0 else min(len(argv), i + num_values)
                while i < end and not argv[i].startswith("--"):
                    i += 1
            logger.warning("Ignoring %s: a vLLM option that has no effect in hfbridge", name)
            continue
        if name in LIST_FLAGS and not eq:
            values = []
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            out += [part for v in values for part in (name, v)] or [name]
            continue
        out.append(f"{name}{eq}{value}")
    return out


class HumanInt(click.ParamType):
    """`32k` = 32,000 and `32K` = 32,768 (vLLM's convention, also m/M, g/G); `auto` and -1 mean "derive it"."""

    name = "integer"
    _UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text.lower() == "auto":
            return -1
        try:
            if text and text[-1] in self._UNITS:
                return int(float(text[:-1]) * self._UNITS[text[-1]])
            return int(text)
        except ValueError:
            self.fail(f"{value!r} is not an integer (examples: 4096, 32k, 32K, auto)", param, ctx)


class StringList(click.ParamType):
    """vLLM's list flags (--allowed-origins '["https://a.example"]'): a JSON list, or comma-separated values."""

    name = "list"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, ...]:
        if isinstance(value, (list, tuple)):
            return tuple(str(v) for v in value)
        text = str(value).strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                self.fail(f"not a JSON list ({e}): {value!r}", param, ctx)
            if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
                self.fail(f"expected a JSON list of strings, got {value!r}", param, ctx)
            return tuple(parsed)
        return tuple(v.strip() for v in text.split(",") if v.strip())


class JsonDict(click.ParamType):
    name = "json"

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            self.fail(f"not valid JSON ({e}): {value!r}", param, ctx)
        if not isinstance(parsed, dict):
            self.fail(f"expected a JSON object, got {type(parsed).__name__}", param, ctx)
        return parsed


def load_config_file(ctx: click.Context, param: Any, path: str | None) -> str | None:
    """--config FILE.yaml: its keys become defaults for the flags; flags on the command line win."""
    if path is None:
        return None
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of flag names to values", ctx, param)
    known = {p.name for p in ctx.command.params}
    defaults = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in known:
            defaults[name] = json.dumps(value) if isinstance(value, dict) else value
        else:
            logger.warning("Ignoring %r from %s: not an option of `hfbridge %s`", key, path, ctx.info_name)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


_LEGACY_TASKS = {  # vLLM 0.11's --task -> 0.33's (runner, convert)
    "auto": ("auto", "auto"), "generate": ("generate", "auto"), "embed": ("pooling", "embed"),
    "embedding": ("pooling", "embed"), "classify": ("pooling", "classify"), "score": ("pooling", "auto"),
    "reward": ("pooling", "embed"),
}
ENGINE_OPTIONS = [
    click.option("--model", "model_flag", metavar="MODEL", hidden=True, help="Deprecated: pass MODEL as argument."),
    click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                 callback=load_config_file, help="YAML file of flag values; flags given here win."),
    click.option("--tokenizer", help="Tokenizer folder or Hub id, if not the model's."),
    click.option("--quantization", help="gguf (implied by a .gguf MODEL), the only quantization served."),
    click.option("--revision", help="Hub branch, tag or commit of the model."),
    click.option("--tokenizer-revision", help="Hub revision of the tokenizer."),
    click.option("--tokenizer-mode", type=click.Choice(["auto", "hf", "slow"]),
                 help="auto / hf: the fast tokenizer where there is one; slow: the Python tokenizer."),
    click.option("--download-dir", type=click.Path(file_okay=False),
                 help="Folder for Hub downloads, instead of the Hugging Face cache."),
    click.option("--hf-token", help="Hugging Face token for gated or private models."),
    click.option("--trust-remote-code/--no-trust-remote-code", default=None,
                 help="Run the model repository's own Python code (config auto_map)."),
    click.option("--dtype", type=click.Choice(["auto", "half", "float16", "bfloat16", "float", "float32"]),
                 help="Weights and activations dtype. [default: auto: float32 on CPU, the config's on GPU]"),
    click.option("--seed", type=int, help="Global random seed. [default: 0]"),
    click.option("--max-model-len", type=HumanInt(), help="Context length (prompt + output); 32k, 32K, auto."),
    click.option("--model-impl", type=click.Choice(["auto", "transformers", "native"]),
                 help="auto: a native implementation if hfbridge has one, else Transformers."),
    click.option("--hf-overrides", type=JsonDict(),
                 help='JSON merged into the HF config, e.g. \'{"rope_theta": 1e6}\'.'),
    click.option("--served-model-name", multiple=True, help="Name(s) clients use in `model`. [default: MODEL]"),
    click.option("--max-logprobs", type=int, help="Most logprobs a request may ask for (-1: no cap). [default: 20]"),
    click.option("--chat-template", help="Jinja chat template (file or text) instead of the tokenizer's."),
    click.option("--generation-config",
                 help="'auto' (the model's generation_config.json), 'vllm' (none), or a folder."),
    click.option("--override-generation-config", type=JsonDict(), help="JSON of sampling defaults to override."),
    click.option("--task", type=click.Choice(sorted(_LEGACY_TASKS)), help="Deprecated: use --runner / --convert."),
    click.option("--runner", type=click.Choice(["auto", "generate", "pooling", "draft"]), help="Engine mode."),
    click.option("--convert", type=click.Choice(["auto", "none", "embed", "classify", "reward"]),
                 help="Adapt a causal LM into a pooling model."),
    click.option("--pooler-config", "--override-pooler-config", "pooler_config", type=JsonDict(),
                 help="JSON pooler settings (pooling models)."),
    click.option("--device", help="auto, cpu, cuda or cuda:N. [default: auto]"),
    click.option("--attention-backend", type=click.Choice(["auto", "torch", "triton", "flash_attn"]),
                 help="Paged-attention kernels. [default: auto]"),
    click.option("--block-size", type=int, help="Tokens per KV-cache block. [default: 16]"),
    click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=None,
                 help="Reuse KV blocks of shared prompt prefixes. [default: on]"),
    click.option("--gpu-memory-utilization", "--device-memory-utilization", "gpu_memory_utilization", type=float,
                 help="Fraction of GPU memory for weights, activations and KV cache. [default: 0.92]"),
    click.option("--kv-cache-memory-bytes", type=HumanInt(), help="KV-cache size in bytes (CPU: its budget); 4G."),
    click.option("--num-gpu-blocks-override", type=int, help="Exact number of KV-cache blocks."),
    click.option("--max-num-seqs", type=int, help="Most requests in one batch."),
    click.option("--max-num-batched-tokens", type=HumanInt(), help="Token budget of one engine step."),
    click.option("--enable-chunked-prefill/--no-enable-chunked-prefill", default=None,
                 help="Split long prompts across steps. [default: on]"),
    click.option("--scheduling-policy", type=click.Choice(["fcfs", "priority"]),
                 help="fcfs: first come, first served (round-robin across requests); priority: a request's "
                      "`priority` orders the queue, lower first, and the highest is preempted first. "
                      "[default: fcfs]"),
    click.option("--tensor-parallel-size", "-tp", "tensor_parallel_size", type=int,
                 help="Tensor-parallel ranks (devices, or CPU processes) per model. [default: 1]"),
    click.option("--distributed-executor-backend", type=click.Choice(["mp", "external_launcher", "ray", "uni"]),
                 help="Who starts the ranks: mp (spawned here), external_launcher (torchrun), ray (actors on a Ray "
                      "cluster; pip install 'hfbridge[ray]'). [default: mp if tp x pp > 1]"),
    click.option("--pipeline-parallel-size", "-pp", "pipeline_parallel_size", type=int,
                 help="Pipeline stages: the model's layers split across ranks (world = tp x pp; uneven splits with "
                      "HFBRIDGE_PP_LAYER_PARTITION). [default: 1]"),
    click.option("--enable-lora/--no-enable-lora", default=None,
                 help="Serve LoRA adapters (--lora-modules, or per request); the native decoders then run eager."),
    click.option("--max-loras", type=int, help="Most distinct LoRA adapters in one batch. [default: 1]"),
    click.option("--max-lora-rank", type=int, help="Highest LoRA rank an adapter may have. [default: 16]"),
    click.option("--max-cpu-loras", type=int,
                 help="LoRA adapters kept loaded (LRU); at least --max-loras. [default: --max-loras]"),
    click.option("--limit-mm-per-prompt", type=JsonDict(),
                 help='Most items of each modality in one prompt, as JSON: \'{"image": 2}\'. [default: 999 images]'),
    click.option("--allowed-local-media-path",
                 help="A folder whose files file:// image URLs may read. [default: none, file:// refused]"),
    click.option("--allowed-media-domains", multiple=True,
                 help="Hosts http(s) image URLs may come from. [default: any]"),
    click.option("--enforce-eager/--no-enforce-eager", default=None,
                 help="Never torch.compile the model (native decoders compile in the background by default)."),
    click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                 show_default=True),
]


def apply_options(options: list) -> Any:
    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def engine_args_from(ctx: click.Context, model: str | None, options: dict[str, Any]) -> EngineArgs:
    """EngineArgs from the flags the user set (EngineArgs keeps its own defaults for the rest)."""
    from hfbridge.engine.engine_args import EngineArgs

    engine_fields = {f.name for f in fields(EngineArgs)}
    given = {k: v for k, v in options.items()
             if ctx.get_parameter_source(k) not in (None, click.core.ParameterSource.DEFAULT)}
    flag_model = given.pop("model_flag", None)
    if flag_model is not None:
        logger.warning("--model is deprecated (as in vLLM): pass the model as the first argument")
        model = model or flag_model
    for name in ("served_model_name", "allowed_media_domains"):
        if name in given:
            given[name] = list(given[name])
    return EngineArgs(model=model, **{k: v for k, v in given.items() if k in engine_fields})
