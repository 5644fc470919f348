"""`lorasync bench ...`: the benchmark subcommands' arguments and handlers (sync, dtype, train)."""

from __future__ import annotations

import argparse
import json

from lorasync.checkpoint import DTYPES
from lorasync.models.resolve import resolve_model
from lorasync.tasks import TASKS


def _bench_sync(args: argparse.Namespace) -> int:
    from lorasync.commands.bench import BenchConfig, format_table, run_bench

    config = BenchConfig(
        arch=args.arch,
        shape=args.shape,
        dtype=args.dtype,
        rank=args.rank,
        targets=tuple(args.targets),
        repeats=args.repeats,
        model=resolve_model(args.model) if args.model else "",
    )
    result = run_bench(config, progress=not args.json)
    if args.server:
        from lorasync.commands.server_bench import format_server, run_server_bench

        result["server"] = run_server_bench(config)
    table = format_table(result)
    if args.server:
        table += "\n" + format_server(result["server"])
    print(json.dumps(result) if args.json else table)
    return 0


def _bench_dtype(args: argparse.Namespace) -> int:
    from lorasync.commands.dtype_bench import DtypeBenchConfig, format_dtypes, run_dtype_bench

    config = DtypeBenchConfig(
        arch=args.arch, shape=args.shape, rank=args.rank, batch=args.batch, tokens=args.tokens,
        repeats=args.repeats,
    )
    result = run_dtype_bench(config, progress=not args.json)
    print(json.dumps(result) if args.json else format_dtypes(result))
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from lorasync.commands.train_bench import TrainBenchConfig, format_table, run_train_bench

    config = TrainBenchConfig(
        model=resolve_model(args.model), task=args.task, steps=args.steps,
        prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
        max_tokens=args.max_tokens, lr=args.lr, rank=args.rank, grad_accum=args.grad_accum,
        eval_n=args.eval_n, dtype=args.dtype, out=args.out, seed=args.seed,
    )
    result = run_train_bench(config)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def add_bench_parsers(sub) -> None:
    """Add `bench` and its subcommands to the CLI's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks (commands, not tests)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    p = bench_sub.add_parser(
        "sync", help="time the sync strategies and the bare-reload floor side by side"
    )
    p.add_argument("--arch", default="qwen2", help="model architecture")
    p.add_argument("--shape", default="0.5b", help="model shape: 0.5b (Qwen2-0.5B) or tiny")
    p.add_argument(
        "--model", default=None,
        help="measure this model (folder or hub name) instead of a random --arch/--shape one",
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="model dtype")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--targets", nargs="+", default=["all-linear"], help="LoRA target modules")
    p.add_argument(
        "--repeats", type=int, default=10,
        help="timed syncs per strategy, taken in turns (min and median are reported)",
    )
    p.add_argument(
        "--server", action="store_true",
        help="also start a `lorasync serve` server and measure the LoRA-factor sync into it",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_sync)
    p = bench_sub.add_parser(
        "dtype", help="float32 against bfloat16 here: the trainer's step and vLLM's decode"
    )
    p.add_argument("--arch", default="qwen2", help="model architecture")
    p.add_argument("--shape", default="0.5b", help="model shape: 0.5b (Qwen2-0.5B) or tiny")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (all-linear)")
    p.add_argument("--batch", type=int, default=2, help="sequences per training step")
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=2, help="timed training steps per dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_dtype)
    p = bench_sub.add_parser(
        "train",
        help="the same GRPO run through TRL's GRPOTrainer (colocated vLLM) and `lorasync train`: "
        "seconds per step, sync seconds and held-out accuracy, side by side",
    )
    p.add_argument("--model", required=True, help="model folder or hub name")
    p.add_argument("--task", choices=tuple(TASKS), default="arith", help="the task (train split; "
                   "accuracy on the test split)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per side (default 10)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (default 8)")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--max-tokens", type=int, default=16, help="completion token limit (default 16)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate, constant (default 3e-4)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank, alpha 2 x rank (default 16)")
    p.add_argument(
        "--grad-accum", type=int, default=2,
        help="micro-batches per optimizer step; must divide prompts x generations (default 2)",
    )
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems (default 200)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="trainers' and engines' dtype (TRL: bf16 autocast for bfloat16)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (both sides)")
    p.add_argument("--out", default="runs/bench_train", help="output folder (default runs/bench_train)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_train)
