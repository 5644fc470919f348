"""`lorasync bench rollout`: lorasync's trainer with synchronous and
asynchronous rollouts (docs/async.md), the same run each way.

Every mode trains the same model on the same task with the same seed, steps, batch shape,
LoRA and optimizer, one after the other in this process, on one engine: a colocated vLLM
engine (streaming sync), or one `lorasync serve` server started here on the model (LoRA-factor
sync; its token a fresh secret; stopped at the end, also on error). Each mode writes its own
run folder (OUT/sync, OUT/async: metrics.jsonl, config.json, the final checkpoint).

Before the modes, one untimed step warms the engine and the trainer up (`warm_up`).
Reported per mode, from its metrics.jsonl: wall-clock seconds per step, the trainer's wait for
its batch per step (all of generation in sync mode; what generation did not hide in async
mode), generation seconds, completion tokens per second of step time, the reward mean over the
last few steps and over all, and the staleness of the trained tokens; with both modes, the
ratios async/sync of step time and of wait; and OUT/reward_vs_time.png, each run's reward
against wall-clock. `--in-flight wait,keep` runs async once per value (server engine only):
syncs that wait for the running requests, and syncs that land in flight (`async-keep`).

`--model tiny` is `lorasync demo --tiny`'s model and toy task (write digits): a tiny Qwen2
built and pre-trained once into OUT/base (`make_tiny_model` + `pretrain`, about 5 s on two
cores) and reused from there, with the demo's batch shape and learning rate. Any other model
learns arithmetic with the settings of configs/smollm2_arith.yaml (`real_demo_config`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

from lorasync.bench.rollout_report import (
    ASYNC_RUNS, LAST_STEPS, TINY, format_table, heading, plot_reward_vs_time, ratios,
)
from lorasync.sync.kinds import IN_FLIGHT
from lorasync.train.config import ROLLOUT_MODES, require

ENGINES = ("colocated", "server")
DTYPES_COMPARED = ("float32", "bfloat16")
MAX_MODEL_LEN = 512  # the server's context, as the colocated engine's default
SHAPE = ("prompts_per_step", "num_generations", "max_tokens", "lr", "rank", "grad_accum")


@dataclass
class RolloutBenchConfig:
    model: str  # "tiny", a model folder or a hub name (resolved by `model_folder`)
    modes: tuple[str, ...] = ROLLOUT_MODES  # run in this order
    max_staleness: int | None = None  # None: 1 when async runs, else 0
    # async runs: one per value, syncs waiting for the running requests or landing in flight
    in_flight: tuple[str, ...] = ("wait",)
    engine: str = "colocated"
    steps: int = 10
    # None: the task's (the tiny demo's, or configs/smollm2_arith.yaml's); see `task_defaults`
    prompts_per_step: int | None = None
    num_generations: int | None = None
    max_tokens: int | None = None
    lr: float | None = None
    rank: int | None = None
    grad_accum: int | None = None
    dtype: str = "float32"
    out: str = "runs/bench_rollout"
    seed: int = 0

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        flag = ",".join(self.modes)
        for mode in self.modes:
            require(mode in ROLLOUT_MODES, "--modes", flag,
                    f"{mode!r} is not a rollout mode; use {', '.join(ROLLOUT_MODES)} or both (sync,async)")
        require(bool(self.modes), "--modes", flag, "name a mode: sync, async or both (sync,async)")
        require(len(set(self.modes)) == len(self.modes), "--modes", flag, "name each mode once")
        if self.max_staleness is None:
            self.max_staleness = 1 if "async" in self.modes else 0
        require(self.max_staleness >= 0, "--max-staleness", self.max_staleness,
                "a batch cannot come from a newer policy than the trained one: use >= 0")
        require("async" in self.modes or self.max_staleness == 0, "--max-staleness", self.max_staleness,
                "only async rollouts run ahead of the policy: add async (--modes sync,async) "
                "or drop --max-staleness")
        require(self.engine in ENGINES, "--engine", self.engine, f"use one of {', '.join(ENGINES)}")
        self.in_flight = tuple(self.in_flight)
        flag = ",".join(self.in_flight)
        require(bool(self.in_flight) and set(self.in_flight) <= set(IN_FLIGHT) and len(set(self.in_flight)) == len(self.in_flight),
                "--in-flight", flag, f"name each of {', '.join(IN_FLIGHT)} at most once (e.g. wait,keep)")
        require("keep" not in self.in_flight or ("async" in self.modes and self.engine == "server"),
                "--in-flight", flag, "keep lets syncs land in an async batch on a server: add "
                "async to --modes and --engine server, or drop it")
        require(self.dtype in DTYPES_COMPARED, "--dtype", self.dtype, f"use one of {', '.join(DTYPES_COMPARED)}")
        require(bool(self.model), "--model", self.model, f"pass {TINY}, a model folder or a hub name")
        require(bool(self.out), "--out", self.out, "name an output folder")
        require(self.steps >= 1, "--steps", self.steps, "must be >= 1")
        for name, value in task_defaults(self.tiny).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("prompts_per_step", "max_tokens", "rank", "grad_accum"):
            require(getattr(self, name) >= 1, _flag(name), getattr(self, name), "must be >= 1")
        require(self.num_generations >= 2, "--num-generations", self.num_generations,
                "GRPO compares completions within a group: use >= 2")
        require(self.lr > 0, "--lr", self.lr, "must be > 0")
        completions = self.prompts_per_step * self.num_generations
        require(completions % self.grad_accum == 0, "--grad-accum", self.grad_accum,
                f"must divide prompts-per-step x num-generations = {completions}")

    @property
    def tiny(self) -> bool:
        return self.model == TINY

    @property
    def task(self) -> str:
        return "digits" if self.tiny else "arith"

    def runs(self) -> list[tuple[str, str, str]]:
        """(key, rollout mode, in_flight) of each run, in order: sync, then async per in_flight."""
        return [
            (key, mode, in_flight)
            for mode in self.modes
            for key, in_flight in ((("sync", "wait"),) if mode == "sync" else
                                   tuple((ASYNC_RUNS[f], f) for f in self.in_flight))
        ]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def task_defaults(tiny: bool) -> dict:
    """Batch shape, learning rate, LoRA rank and micro-batches of the tiny demo's run
    (`demo_config`) or of the arithmetic run (`real_demo_config`)."""
    from lorasync.recipes.demo import demo_config, real_demo_config

    base = demo_config(Path("out")) if tiny else real_demo_config(Path("out"), "model")
    r, o = base.rollout, base.optim
    return dict(prompts_per_step=r.prompts_per_step, num_generations=r.num_generations,
                max_tokens=r.max_tokens, lr=o.lr, rank=base.lora.rank, grad_accum=o.grad_accum)


def _log(message: str) -> None:
    print(f"[bench rollout] {message}", file=sys.stderr, flush=True)


# -- the model, the engine, the runs ----------------------------------------------------------


def tiny_base(out: Path) -> Path:
    """The tiny demo's base model in OUT/base: built and pre-trained there once (seed 0, as
    `lorasync demo --tiny`), then reused. Built aside and moved in, so a half-built one is
    never taken for a finished one."""
    from lorasync.recipes.demo import pretrain
    from lorasync.models.tiny import make_tiny_model

    base = out / "base"
    if (base / "model.safetensors").is_file():
        _log(f"the tiny demo model: {base} (built before)")
        return base
    _log(f"building the tiny demo model into {base} (make_tiny_model + pretrain)")
    partial = out / "base.partial"
    shutil.rmtree(partial, ignore_errors=True)
    make_tiny_model(partial, arch="qwen2", seed=0)
    pretrain(partial, seed=0)
    partial.rename(base)
    return base


def model_folder(config: RolloutBenchConfig) -> str:
    """The model folder the runs train: the tiny demo's, or --model resolved."""
    from lorasync.models.resolve import resolve_model

    if config.tiny:
        return str(tiny_base(Path(config.out)))
    folder = resolve_model(config.model)
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"--model = {config.model!r}: no config.json in {folder}; pass a model folder or a hub name")
    return folder


def train_config(
    config: RolloutBenchConfig, model: str, mode: str, servers: Sequence[str] = (), in_flight: str = "wait"
):
    """The TrainConfig of one run: the task's run with the bench's settings; the runs differ
    only in rollout.mode, rollout.max_staleness, rollout.in_flight and output_dir."""
    from lorasync.recipes.demo import demo_config, real_demo_config
    from lorasync.train.config import EngineSection, ModelConfig, RolloutConfig, SyncSection

    out = Path(config.out) / (mode if mode == "sync" else ASYNC_RUNS[in_flight])
    base = demo_config(out, config.steps, config.seed) if config.tiny else real_demo_config(
        out, model, config.steps, config.seed)
    server = config.engine == "server"
    return dataclasses.replace(  # replace() validates every section again
        base,
        model=ModelConfig(base=model, dtype=config.dtype),
        lora=dataclasses.replace(base.lora, rank=config.rank, alpha=2.0 * config.rank),
        rollout=RolloutConfig(
            prompts_per_step=config.prompts_per_step, num_generations=config.num_generations,
            max_tokens=config.max_tokens, temperature=base.rollout.temperature, mode=mode,
            max_staleness=config.max_staleness if mode == "async" else 0, in_flight=in_flight,
        ),
        optim=dataclasses.replace(base.optim, steps=config.steps, lr=config.lr,
                                  grad_accum=config.grad_accum, seed=config.seed),
        engine=EngineSection(kind="server", servers=list(servers)) if server else EngineSection(),
        sync=SyncSection(strategy="factors" if server else "streaming"),
        output_dir=str(out),
        save_every=0,
    )


@contextmanager
def bench_engine(config: RolloutBenchConfig, model: str) -> Iterator[tuple[object, list[str]]]:
    """The engine every mode trains with, and the servers' URLs (none when colocated). With
    --engine server: one `lorasync serve` server on the model, stopped on the way out."""
    from lorasync.backend.open import open_engine
    from lorasync.sync.base import Strategy

    if config.engine == "colocated":
        _log("starting the colocated vLLM engine")
        engine = open_engine("colocated", Strategy.STREAMING, model, config.dtype, seed=config.seed,
                             lora_rank=config.rank)
        try:
            yield engine, []
        finally:
            engine.close()
        return
    from lorasync.server.serve.launch import free_port, start_server, wait_healthy

    token, port = secrets.token_hex(16), free_port()
    url = f"http://127.0.0.1:{port}"
    _log(f"starting `lorasync serve` on {url}")
    server = start_server(
        model, token, port,
        ["--dtype", config.dtype, "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
         "--disable-uvicorn-access-log"],
        env_extra={"VLLM_LOGGING_LEVEL": "WARNING"},
    )
    try:
        wait_healthy(url, server, timeout=600)
        engine = open_engine("server", Strategy.FACTORS, servers=[url], token=token)
        try:
            yield engine, [url]
        finally:
            engine.close()
    finally:
        _log("stopping the server")
        server.terminate()
        try:
            server.wait(timeout=120)
        except Exception:  # noqa: BLE001 - TimeoutExpired: it did not stop in time
            server.kill()
            server.wait()


def warm_up(config: RolloutBenchConfig, model: str, engine, servers: Sequence[str]) -> float:
    """One untimed synchronous step into OUT/warmup, its metrics dropped: the first generation
    of an engine and the trainer's first update are several times slower than the rest
    (measured: 3.2 s against 0.07 s on the tiny model), and would count against whichever
    mode ran first. Returns its seconds."""
    from lorasync.train.trainer import GRPOTrainer

    start = time.perf_counter()
    train = train_config(dataclasses.replace(config, steps=1), model, "sync", servers)
    GRPOTrainer(dataclasses.replace(train, output_dir=str(Path(config.out) / "warmup")), engine).train(progress=False)
    gc.collect()
    return time.perf_counter() - start


def run_mode(
    config: RolloutBenchConfig, model: str, mode: str, engine, servers: Sequence[str], in_flight: str = "wait"
) -> dict:
    """One run on `engine`; its summary (`summarize`) and what it ran with."""
    from lorasync.train.trainer import GRPOTrainer

    train = train_config(config, model, mode, servers, in_flight)
    if servers:  # what the server client's syncs do to the running requests, for this run
        engine.in_flight = in_flight
    trainer = GRPOTrainer(train, engine)
    start = time.perf_counter()
    rows = trainer.train(progress=True)
    run_seconds = time.perf_counter() - start
    del trainer
    gc.collect()
    ran = json.loads((Path(train.output_dir) / "config.json").read_text())  # as the trainer wrote it
    side = summarize(rows)
    side.update(
        rollout={k: ran["rollout"][k] for k in ("mode", "max_staleness", "in_flight")},
        sync_strategy=ran["sync"]["strategy"], run_seconds=run_seconds, run_dir=train.output_dir,
    )
    return side


def summarize(rows: list[dict]) -> dict:
    """Per step means (step, wait, generation and sync seconds), tokens per second of step
    time, the reward mean over the last LAST_STEPS steps and over all, staleness, health."""
    n = len(rows)

    def mean(key: str, of: list[dict] = rows) -> float:
        return sum(r[key] for r in of) / len(of)

    tokens = sum(r["completion_tokens"] for r in rows)
    seconds = sum(r["step_seconds"] for r in rows)
    last = rows[-LAST_STEPS:]
    keys = ("step", "step_seconds", "wait_seconds", "generation_seconds", "sync_seconds",
            "completion_tokens", "tokens_per_second", "reward_mean", "staleness_max",
            "staleness_mean", "policy_versions", "logprob_diff_max")
    return {
        "steps": n,
        **{k: mean(k) for k in ("step_seconds", "wait_seconds", "generation_seconds", "sync_seconds")},
        "tokens_per_second": tokens / seconds,
        "reward_mean": mean("reward_mean"),
        "reward_mean_last": mean("reward_mean", last),
        "last_steps": len(last),
        "staleness_max": max(r["staleness_max"] for r in rows),
        # per trained token, as the rows' means are
        "staleness_mean": sum(r["staleness_mean"] * r["completion_tokens"] for r in rows) / max(tokens, 1),
        "logprob_diff_max": max(r["logprob_diff_max"] for r in rows),
        "per_step": [{k: r[k] for k in keys} for r in rows],
    }


# -- the bench -------------------------------------------------------------------------------


def run_rollout_bench(config: RolloutBenchConfig) -> dict:
    """Every mode in turn on one engine; the JSON-ready result. Progress goes to stderr, and
    so does anything the libraries print (stdout is the caller's, for the result)."""
    from lorasync import machine

    result: dict = {"config": asdict(config) | {"task": config.task}, "machine": machine.describe()}
    with redirect_stdout(sys.stderr):
        model = model_folder(config)
        result["model_dir"] = model
        modes = {}
        with bench_engine(config, model) as (engine, servers):
            result["engine"] = {"kind": config.engine, "servers": servers}
            _log("warm-up: one untimed step")
            result["warmup_seconds"] = warm_up(config, model, engine, servers)
            for key, mode, in_flight in config.runs():
                _log(f"{key} rollouts: {config.steps} steps")
                modes[key] = run_mode(config, model, mode, engine, servers, in_flight)
    result["modes"] = modes
    result["async_over_sync"] = ratios(modes)
    if "async-keep" in modes:
        result["keep_over_sync"] = ratios(modes, "async-keep")
    plot = Path(config.out) / "reward_vs_time.png"
    plot_reward_vs_time(modes, plot, heading(result))
    result["plot"] = str(plot)
    return result
