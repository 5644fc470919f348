"""`lorasync bench ...`: the benchmark subcommands' arguments and handlers (sync, dtype, verdict,
train; train --rollout: rollout_bench.py)."""

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


def _bench_verdict(args: argparse.Namespace) -> int:
    from lorasync.commands.verdict_bench import VerdictBenchConfig, default_model, run_verdict_bench
    from lorasync.commands.verdict_report import format_table

    config = VerdictBenchConfig(
        model=resolve_model(args.model) if args.model else default_model(), dtype=args.dtype,
        syncs=args.syncs, rank=args.rank, trained=args.trained,
    )
    result = run_verdict_bench(config, progress=not args.json)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


# The flags only one kind of `bench train` takes (default None: given when not None), and the
# batch-shape flags, whose defaults are the task's (TrainBenchConfig's, rollout_bench.task_defaults).
TRL_ONLY = ("eval_n",)
ROLLOUT_ONLY = ("max_staleness", "engine", "in_flight")
SHAPE_FLAGS = ("prompts_per_step", "num_generations", "max_tokens", "lr", "rank", "grad_accum")


def _refuse_given(args: argparse.Namespace, names, fix: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None:
            raise ValueError(f"--{name.replace('_', '-')} = {value!r}: {fix}")


def _bench_train(args: argparse.Namespace) -> int:
    if args.rollout is not None:
        return _bench_rollout(args)
    from lorasync.commands.rollout_bench import TINY
    from lorasync.commands.train_bench import TrainBenchConfig, format_table, run_train_bench

    _refuse_given(args, ROLLOUT_ONLY, "it is for comparing rollout modes: add --rollout sync,async, or drop it")
    if args.model == TINY:
        raise ValueError(f"--model = {TINY!r}: the tiny demo model is for comparing rollout modes "
                         "(add --rollout sync,async); TRL's side needs a chat model: pass a model folder or hub name")
    given = {name: getattr(args, name) for name in (*SHAPE_FLAGS, "task", "eval_n", "out")}
    config = TrainBenchConfig(
        model=resolve_model(args.model), steps=args.steps, dtype=args.dtype, seed=args.seed,
        **{name: value for name, value in given.items() if value is not None},
    )
    result = run_train_bench(config)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _bench_rollout(args: argparse.Namespace) -> int:
    from lorasync.commands.rollout_bench import TINY, RolloutBenchConfig, format_table, run_rollout_bench

    _refuse_given(args, TRL_ONLY, "it is for the TRL comparison; the rollout comparison measures no "
                  "held-out accuracy: drop it")
    if args.model == TINY:
        _refuse_given(args, ("task",), f"--model {TINY} learns the tiny demo's toy task (write digits) "
                      "only: drop --task")
    config = RolloutBenchConfig(
        model=args.model, modes=tuple(m.strip() for m in args.rollout.split(",")),
        max_staleness=args.max_staleness, engine=args.engine or "colocated", steps=args.steps,
        in_flight=tuple(f.strip() for f in (args.in_flight or "wait").split(",")),
        dtype=args.dtype, seed=args.seed, out=args.out or "runs/bench_rollout",
        **{name: getattr(args, name) for name in SHAPE_FLAGS},
    )
    result = run_rollout_bench(config)
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
        "verdict",
        help="the sync verdict's two levels (weights, logprobs) on right and broken syncs: "
        "false alarms and misses, one row per case",
        description="On one colocated engine: right syncs (zero, random and optionally trained "
        "adapters over --syncs syncs each, merge-unmerge once) must pass both levels after every "
        "sync; broken ones (a skipped sync, a stale tensor, a wrong scale, two layers swapped, "
        "a stale lm_head) must be caught by at least one. Each level's numbers, against the floor "
        "measured before any sync.",
    )
    p.add_argument(
        "--model", default=None,
        help="model folder or hub name (llama-like: q_proj layers); default: SmolLM2-135M-Instruct "
        "as `lorasync get-model smollm2-135m-instruct` puts it in the cache",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the trainer's and the engine's dtype")
    p.add_argument("--syncs", type=int, default=10,
                   help="syncs per right streaming case, each verified (default 10)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the made-up adapters (alpha 2 x rank)")
    p.add_argument("--trained", default=None, metavar="ADAPTER_DIR",
                   help="a trained adapter of --model (PEFT folder): one more right case; default: none")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_verdict)
    p = bench_sub.add_parser(
        "train",
        help="the same GRPO run through TRL's GRPOTrainer (colocated vLLM) and `lorasync train`: "
        "seconds per step, sync seconds and held-out accuracy, side by side; or, with --rollout, "
        "lorasync's trainer with synchronous and asynchronous rollouts",
        description="Without --rollout: TRL's GRPOTrainer against `lorasync train`, the same run. "
        "With --rollout sync,async: `lorasync train` with each rollout mode in turn (same seed, "
        "steps and batch shape, one engine, after one untimed warm-up step), a row per mode: "
        "seconds per step, the trainer's wait for generation per step, tokens per second, reward "
        "mean (last 5 steps and all), staleness max, and the ratios async/sync of step time and wait. "
        "`--model tiny --rollout sync,async` runs in about a minute on two cores.",
    )
    p.add_argument(
        "--model", required=True,
        help="model folder or hub name (the arith task); with --rollout also `tiny`: the tiny "
        "demo's model (`lorasync demo --tiny`, built and pre-trained once into --out/base) "
        "and its toy task (write digits), with the demo's batch shape and learning rate",
    )
    p.add_argument("--task", choices=tuple(TASKS), default=None, help="the task (train split; "
                   "accuracy on the test split); default arith")
    p.add_argument(
        "--rollout", default=None, metavar="MODES",
        help="compare rollout modes of lorasync's trainer instead of TRL against lorasync: "
        "sync, async or both, comma-separated, run in that order (e.g. sync,async)",
    )
    p.add_argument(
        "--max-staleness", type=int, default=None, metavar="K",
        help="with --rollout: how many policy versions an async batch may lag (rollout.max_staleness; "
        "default 1 when async runs)",
    )
    p.add_argument(
        "--in-flight", default=None, metavar="MODES",
        help="with --rollout async and --engine server: what a sync does to the requests running "
        "(rollout.in_flight): wait (default), keep, or wait,keep for one async run each",
    )
    p.add_argument(
        "--engine", choices=("colocated", "server"), default=None,
        help="with --rollout: colocated (default: one vLLM engine in this process, streaming sync) "
        "or server (one `lorasync serve` started on the model, LoRA-factor sync, stopped at the end)",
    )
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per side or mode (default 10)")
    p.add_argument("--prompts-per-step", type=int, default=None,
                   help="prompts per step (default 8; --model tiny: 4)")
    p.add_argument("--num-generations", type=int, default=None, help="completions per prompt (default 8)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="completion token limit (default 16; --model tiny: 12)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate, constant (default 3e-4; --model tiny: 2e-3)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank, alpha 2 x rank (default 16)")
    p.add_argument(
        "--grad-accum", type=int, default=None,
        help="micro-batches per optimizer step; must divide prompts x generations "
        "(default 2; --model tiny: 1)",
    )
    p.add_argument("--eval-n", type=int, default=None,
                   help="held-out problems (default 200; not with --rollout)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="trainers' and engines' dtype (TRL: bf16 autocast for bfloat16)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (every side or mode)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/bench_train; with --rollout runs/bench_rollout)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench_train)
