"""`lorasync bench ...`: the benchmark subcommands' arguments and handlers (sync, dtype, verdict,
trl, rollout; train: the old name of trl). The benchmarks themselves: lorasync/bench/."""

from __future__ import annotations

import argparse
import json
import sys

from lorasync.served_model import DTYPES
from lorasync.models.resolve import resolve_model
from lorasync.tasks.registry import TASKS


def _bench_sync(args: argparse.Namespace) -> int:
    from lorasync.bench.sync import BenchConfig, format_table, run_bench

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
        from lorasync.bench.server import format_server, run_server_bench

        result["server"] = run_server_bench(config)
    table = format_table(result)
    if args.server:
        table += "\n" + format_server(result["server"])
    print(json.dumps(result) if args.json else table)
    return 0


def _bench_dtype(args: argparse.Namespace) -> int:
    from lorasync.bench.dtype import DtypeBenchConfig, format_dtypes, run_dtype_bench

    config = DtypeBenchConfig(
        arch=args.arch, shape=args.shape, rank=args.rank, batch=args.batch, tokens=args.tokens,
        repeats=args.repeats,
    )
    result = run_dtype_bench(config, progress=not args.json)
    print(json.dumps(result) if args.json else format_dtypes(result))
    return 0


def _bench_verdict(args: argparse.Namespace) -> int:
    from lorasync.bench.verdict import VerdictBenchConfig, default_model, run_verdict_bench
    from lorasync.bench.verdict_report import format_table

    config = VerdictBenchConfig(
        model=resolve_model(args.model) if args.model else default_model(), dtype=args.dtype,
        syncs=args.syncs, rank=args.rank, trained=args.trained,
    )
    result = run_verdict_bench(config, progress=not args.json)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


# The batch-shape flags of `bench trl` and `bench rollout`: default None, the task's
# (TrlBenchConfig's; rollout.task_defaults: the tiny demo's or the arithmetic run's).
SHAPE_FLAGS = ("prompts_per_step", "num_generations", "max_tokens", "lr", "rank", "grad_accum")
# `bench train`, the old name of `bench trl`, also took these for the rollout comparison
# (`--rollout MODES`): now `bench rollout`. Still read there, to say so.
ROLLOUT_FLAGS = ("rollout", "max_staleness", "in_flight", "engine")


def _bench_trl(args: argparse.Namespace) -> int:
    from lorasync.bench.rollout_report import TINY
    from lorasync.bench.trl import TrlBenchConfig, format_table, run_trl_bench

    if args.model == TINY:
        raise ValueError(f"--model = {TINY!r}: the tiny demo model is for comparing rollout modes "
                         f"(lorasync bench rollout --model {TINY}); TRL's side needs a chat model: "
                         "pass a model folder or hub name")
    given = {name: getattr(args, name) for name in (*SHAPE_FLAGS, "task", "eval_n", "out")}
    if args.sides is not None:
        given["sides"] = tuple(side.strip() for side in args.sides.split(","))
    config = TrlBenchConfig(
        model=resolve_model(args.model), steps=args.steps, dtype=args.dtype, seed=args.seed,
        **{name: value for name, value in given.items() if value is not None},
    )
    result = run_trl_bench(config)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    """`bench train`: `bench trl` under its old name; its old `--rollout` is `bench rollout`."""
    print("lorasync bench: note: `bench train` is now `lorasync bench trl`; with --rollout, "
          "`lorasync bench rollout`", file=sys.stderr)
    for name in ROLLOUT_FLAGS:
        value = getattr(args, name)
        if value is not None:
            flag = "--" + name.replace("_", "-")
            fix = "its --modes" if name == "rollout" else f"its {flag}"
            raise ValueError(f"{flag} = {value!r}: the rollout comparison is its own command: "
                             f"lorasync bench rollout (the same run, {fix}); `bench train` is `bench trl` only")
    return _bench_trl(args)


def _bench_rollout(args: argparse.Namespace) -> int:
    from lorasync.bench.rollout import RolloutBenchConfig, run_rollout_bench
    from lorasync.bench.rollout_report import format_table

    config = RolloutBenchConfig(
        model=args.model, modes=tuple(m.strip() for m in args.modes.split(",")),
        max_staleness=args.max_staleness, engine=args.engine, steps=args.steps,
        in_flight=tuple(f.strip() for f in args.in_flight.split(",")),
        dtype=args.dtype, seed=args.seed, out=args.out,
        **{name: getattr(args, name) for name in SHAPE_FLAGS},
    )
    result = run_rollout_bench(config)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _add_run_args(p: argparse.ArgumentParser, rollout: bool) -> None:
    """The flags `bench trl` and `bench rollout` share: the run's length, batch shape and
    dtype. `rollout`: also name the defaults `--model tiny` takes."""
    def default(other: str, tiny: str | None) -> str:
        return f"(default {other}; --model tiny: {tiny})" if rollout and tiny else f"(default {other})"

    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per step " + default("8", "4"))
    p.add_argument("--num-generations", type=int, default=None,
                   help="completions per prompt " + default("8", None))
    p.add_argument("--max-tokens", type=int, default=None, help="completion token limit " + default("16", "12"))
    p.add_argument("--lr", type=float, default=None, help="learning rate, constant " + default("3e-4", "2e-3"))
    p.add_argument("--rank", type=int, default=None, help="LoRA rank, alpha 2 x rank (default 16)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimizer step; must divide prompts x generations " + default("4", "1"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="trainers' and engines' dtype"
                   + ("" if rollout else " (TRL: bf16 autocast for bfloat16)"))
    p.add_argument("--seed", type=int, default=0, help="random seed (every run)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_trl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or hub name: a chat model (TRL applies its chat template)")
    single_turn = tuple(name for name, task in TASKS.items() if not hasattr(task, "ENVIRONMENT"))
    p.add_argument("--task", choices=single_turn, default=None, help="the task (train split; "
                   "accuracy on the test split); default arith")
    _add_run_args(p, rollout=False)
    p.add_argument("--eval-n", type=int, default=None, help="held-out problems (default 200)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench_trl)")
    p.add_argument("--sides", default=None, help="the runs, in order, comma-separated: lorasync "
                   "(shared-prefix scoring), plain (lorasync scoring each sequence whole), trl "
                   "(default all three)")


TRL_HELP = ("the same GRPO run through TRL's GRPOTrainer (colocated vLLM) and `lorasync train`: "
            "seconds per step, sync seconds and held-out accuracy, side by side")


def _add_train_parsers(bench_sub) -> None:
    """`bench trl`, `bench rollout`, and `bench train`: the old name of `bench trl`."""
    p = bench_sub.add_parser("trl", help=TRL_HELP, description="TRL's GRPOTrainer against `lorasync "
                             "train`, the same run (model, prompts in order, rewards, LoRA, optimizer, "
                             "batch shape, steps), one after the other; then each adapter's held-out accuracy.")
    _add_trl_args(p)
    p.set_defaults(func=_bench_trl)

    p = bench_sub.add_parser(
        "rollout",
        help="lorasync's trainer with synchronous and asynchronous rollouts, the same run each way",
        description="`lorasync train` with each rollout mode in turn (same seed, steps and batch "
        "shape, one engine, after one untimed warm-up step), a row per mode: seconds per step, the "
        "trainer's wait for generation per step, tokens per second, reward mean (last 5 steps and "
        "all), staleness max, and the ratios async/sync of step time and wait. "
        "`--model tiny` runs in about a minute on two cores.",
    )
    p.add_argument(
        "--model", required=True,
        help="model folder or hub name (the arith task), or `tiny`: the tiny demo's model "
        "(`lorasync demo --tiny`, built and pre-trained once into --out/base) and its toy task "
        "(write digits), with the demo's batch shape and learning rate",
    )
    p.add_argument("--modes", default="sync,async", metavar="MODES",
                   help="sync, async or both, comma-separated, run in that order (default sync,async)")
    p.add_argument("--max-staleness", type=int, default=None, metavar="K",
                   help="how many policy versions an async batch may lag (rollout.max_staleness; "
                   "default 1 when async runs)")
    p.add_argument("--engine", choices=("colocated", "server"), default="colocated",
                   help="colocated (default: one vLLM engine in this process, streaming sync) or server "
                   "(one `lorasync serve` started on the model, LoRA-factor sync, stopped at the end)")
    p.add_argument("--in-flight", default="wait", metavar="MODES",
                   help="with async and --engine server: what a sync does to the requests running "
                   "(rollout.in_flight): wait (default), keep, or wait,keep for one async run each")
    _add_run_args(p, rollout=True)
    p.add_argument("--out", default="runs/bench_rollout", help="output folder (default runs/bench_rollout)")
    p.set_defaults(func=_bench_rollout)

    p = bench_sub.add_parser("train", help="the old name of `bench trl` (a note says so)",
                             description="`lorasync bench trl` under its old name. Its old `--rollout "
                             "MODES` comparison is `lorasync bench rollout --modes MODES`.")
    _add_trl_args(p)
    for name in ROLLOUT_FLAGS:  # read only to name `bench rollout`
        p.add_argument("--" + name.replace("_", "-"), default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_bench_train)


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
    _add_train_parsers(bench_sub)
