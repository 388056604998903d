"""The `sarathi` command: model preparation, offline generation, serving, benchmarks, operator, autotuner."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sarathi_engine.bench.cli import add_bench_parser
from sarathi_engine.flags import add_engine_args, engine_kwargs


def cmd_model(args: argparse.Namespace) -> int:
    from sarathi_engine import model_store

    if args.action == "prepare":
        print(model_store.prepare_default_model())
        return 0
    if not args.repo or not args.local_dir:
        raise ValueError("sarathi model download needs a repository (org/name) and --local-dir")
    fetched = model_store.download_once(args.repo, Path(args.local_dir))
    print(f"{args.repo}: {'downloaded into' if fetched else 'already in'} {args.local_dir}")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from sarathi_engine import kernels

    if kernels.unusable_reason():
        print(f"the CPU kernels do not apply here ({kernels.unusable_reason()}): the engine uses torch ops")
        return 0
    reason = kernels.load()
    if reason:
        print(f"the CPU kernels could not be built: {reason}", file=sys.stderr)
        return 1
    print(kernels.library_path())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sarathi_engine import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    try:
        prompt = llm.chat_prompt(args.prompt) if args.chat else args.prompt
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.sampling_seed)
        print(llm.generate(prompt, params)[0].text)
    finally:
        llm.engine.shutdown()  # stops the other ranks cleanly when the model spans processes
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sarathi_engine.server.main import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarathi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="prepare the bundled model, or download a Hugging Face repository once")
    model.add_argument("action", choices=["prepare", "download"])
    model.add_argument("repo", nargs="?", help="download: the Hugging Face repository, org/name")
    model.add_argument("--local-dir", help="download: the folder to fill; downloaders of one folder take turns")
    model.set_defaults(func=cmd_model)

    kernels = sub.add_parser("kernels", help="build the CPU kernels once (engine starts then only load them)")
    kernels.set_defaults(func=cmd_kernels)

    generate = sub.add_parser("generate", help="complete one prompt offline")
    add_engine_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--sampling-seed", type=int, default=None)
    generate.set_defaults(func=cmd_generate)

    from sarathi_engine.server.main import add_serve_args

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    add_bench_parser(sub)

    # Listed for --help only: main() hands `sarathi operator ...` and `sarathi autotune ...` to the
    # operator's own parsers.
    sub.add_parser("operator", help="run the Kubernetes operator (sarathi operator --help)")
    sub.add_parser("autotune", help="tune engines' token budget to a TBT SLO, without Kubernetes "
                                    "(sarathi autotune --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:
        from sarathi_operator.cli import main as operator_main

        return operator_main(argv[1:])
    if argv[:1] == ["autotune"]:
        from sarathi_operator.autotune.cli import main as autotune_main

        return autotune_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sarathi: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
