"""The `sarathi` command: model preparation, offline generation, serving, benchmarks, operator, autotuner."""
from __future__ import annotations

import argparse
import sys

from sarathi_engine.bench.cli import add_bench_parser
from sarathi_engine.config import POLICIES
from sarathi_engine.model_store import DEFAULT_MODEL


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} or a local Hugging Face folder")
    parser.add_argument("--policy", default="sarathi", choices=POLICIES)
    parser.add_argument("--token-budget", type=int, default=512, help="most tokens one iteration may hold")
    parser.add_argument("--tbt-slo-ms", type=float, default=None,
                        help="sarathi policy: size each iteration's prefill chunks so that its predicted time "
                             "stays within this time between tokens (the token budget stays the cap)")
    parser.add_argument("--min-prefill-chunk", type=int, default=16,
                        help="prompt tokens an iteration takes under --tbt-slo-ms even when its decodes fill the SLO")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--kv-cache-memory", default="1GiB", help="KV cache size on CPU, e.g. 512MiB, 2GiB")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, policy=args.policy, token_budget=args.token_budget, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, dtype=args.dtype, device=args.device,
        kv_cache_memory=args.kv_cache_memory, block_size=args.block_size, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        tbt_slo_ms=args.tbt_slo_ms, min_prefill_chunk=args.min_prefill_chunk,
    )


def cmd_model(args: argparse.Namespace) -> int:
    from sarathi_engine.model_store import prepare_default_model

    print(prepare_default_model())
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

    model = sub.add_parser("model", help="prepare the bundled model")
    model.add_argument("action", choices=["prepare"])
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
