"""`lorasync bench verdict`: does the sync verdict pass right syncs and catch broken ones, at
each of its levels?

One colocated engine in one dtype; the verdict's floor is measured once on it before any sync
(engine version 0, the trainer's adapter disabled), on `verify.verdict_probes`: the random
probe sets plus `TASK_PROMPTS` arith prompts with the engine's own sampled completions. Then
each case syncs a policy into the same engine and runs the verdict at both levels: the weight
level (`weight_check.check_weights`: what the engine reads back against what the policy gives)
and the logprob level (`verify.verify`, judged by `verify.judge` against the floor). The
generation cases add the cache level (`verify.verify_cache`: the engine's sampling logprobs
against its own scoring), judged against its floor, measured on the long prompts at version 0.

The cases (`verdict_cases.py`): right syncs (`correct`) must pass both levels after every
sync, and every failure is a false alarm; broken ones must be caught by at least one level.

    lorasync bench verdict --dtype bfloat16 --syncs 10 [--trained ADAPTER_DIR] [--json]

On a shared machine prefix it with OMP_NUM_THREADS=1: with other jobs on the cores, the
trainer's forward on 2 OpenMP threads measured 10x slower than on 1 (oversubscribed threads
spin), and vLLM forbids changing the count once its engine runs. The command recorded with
the result says which it was.
"""

from __future__ import annotations

import datetime
import gc
import os
import shlex
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasync import machine
from lorasync.served_model import DTYPES, check_dtype
from lorasync.engines.colocated import ColocatedEngine, EngineConfig
from lorasync.sync.policy import AdapterSpec, attach_random_adapter, find_adapter
from lorasync.sync.verify import (
    MEAN_FACTOR,
    QUANTILE,
    QUANTILE_FACTOR,
    Verification,
    cache_probes,
    default_tolerance,
    judge,
    measure_cache_floor,
    measure_floor,
    verdict_probes,
    verify,
    verify_cache,
    verify_generation,
)
from lorasync.sync.weight_check import check_weights
from lorasync.sync.weight_sync import WeightSync
from lorasync.tasks import arith
from lorasync.models.prompt import encode_prompt
from lorasync.bench.verdict_cases import STEP_STD, cases
from lorasync.bench.verdict_report import git_commit, summarize

# The task's own sequences in the probes: this many arith prompts, each with one completion of
# TASK_TOKENS tokens sampled by the engine from the checkpoint.
TASK_PROMPTS, TASK_TOKENS = 8, 16
SMOLLM2 = "smollm2-135m-instruct"

def default_model() -> str:
    """The SmolLM2-135M-Instruct folder `lorasync get-model` makes in the cache (as the tests'
    `smollm2` fixture does)."""
    from lorasync.machine import cache_dir

    folder = cache_dir() / "models" / SMOLLM2
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {folder} (the default --model): run `lorasync get-model {SMOLLM2} "
            f"--out {folder}` once, or pass --model"
        )
    return str(folder)


@dataclass
class VerdictBenchConfig:
    model: str
    dtype: str = "float32"
    syncs: int = 10  # syncs (each verified) per right streaming case
    rank: int = 16  # of the zero and random adapters (alpha 2 x rank)
    trained: str | None = None  # a trained adapter of `model`: one more right case
    seed: int = 0

    def __post_init__(self) -> None:
        check_dtype(self.dtype, "--dtype")
        if self.syncs < 1 or self.rank < 1:
            raise ValueError(f"--syncs and --rank must be >= 1, got {self.syncs}, {self.rank}")
        if self.trained is not None:
            find_adapter(self.trained)  # FileNotFoundError, saying what a folder must hold

    def command(self) -> str:
        """The command that reruns this benchmark."""
        args = ["lorasync", "bench", "verdict", "--model", self.model, "--dtype", self.dtype,
                "--syncs", str(self.syncs), "--rank", str(self.rank)]
        if self.trained is not None:
            args += ["--trained", self.trained]
        return shlex.join(args)


class Bench:
    """The engine, its floor and the probes, shared by every case; `measure` runs the verdict."""

    def __init__(self, config: VerdictBenchConfig, engine: ColocatedEngine) -> None:
        self.config, self.engine = config, engine
        self.tolerance = default_tolerance(config.dtype)
        self.probes: list[list[int]] = []
        self.floor: Verification | None = None
        self.cache_floor: Verification | None = None
        self.long_prompts = cache_probes(engine.vocab_size)
        layout = engine.checkpoint_layout()
        # in layer order (the layout's is the checkpoint's: layers.10 before layers.2)
        self.q_projs = sorted((name for name in layout if name.endswith("self_attn.q_proj.weight")),
                              key=lambda name: [int(p) if p.isdigit() else -1 for p in name.split(".")])
        if len(self.q_projs) < 2:
            raise ValueError(
                f"{config.model}: bench verdict breaks q_proj weights (self_attn.q_proj) of two "
                "layers, which this model does not have: use a llama-like model"
            )
        # the layer broken by one stale tensor, and the pair swapped: the middle of the stack
        self.middle = (len(self.q_projs) - 1) // 2

    def measure_floor(self, model: PeftModel) -> None:
        """Probes (with the task's sequences, sampled from the checkpoint) and their floor."""
        tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        prompts = [encode_prompt(tokenizer, row["prompt"])
                   for row in arith.rows("train", TASK_PROMPTS, seed=self.config.seed)]
        outs = self.engine.generate(prompts, TASK_TOKENS, temperature=1.0, seed=self.config.seed)
        task = [p + group[0].token_ids for p, group in zip(prompts, outs)]
        self.probes = verdict_probes(self.engine.vocab_size, task)
        self.floor = measure_floor(model, self.engine, self.probes)
        self.cache_floor = measure_cache_floor(self.engine, self.long_prompts)

    def policy(self, std: float, modules_to_save: tuple[str, ...] = ()) -> PeftModel:
        """The base model in the bench's dtype with a LoRA adapter on every linear layer: PEFT's
        init (lora_B zero) plus N(0, std) on every trainable tensor."""
        base = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=DTYPES[self.config.dtype])
        spec = AdapterSpec(rank=self.config.rank, init_std=std, seed=self.config.seed,
                           modules_to_save=list(modules_to_save))
        return attach_random_adapter(base, spec)

    def measure(self, sync: WeightSync, sampled: list[list[int]] | None = None) -> dict:
        """The verdict on what the engine serves now: the weights and the logprob level on the
        probes' prompt logprobs; or with `sampled`, the logprob level on the sampling
        logprobs of completions the engine generates from those prompts, and the cache level
        (`verify.verify_cache`) on the same prompts."""
        weights = check_weights(sync)
        if weights is None:
            raise RuntimeError("the engine cannot read its weights back (WeightReader)")
        if sampled is None:
            check = verify(sync.model, self.engine, self.probes)
        else:
            check = verify_generation(sync.model, self.engine, sampled, TASK_TOKENS, self.config.seed)
        verdict = judge(check, self.tolerance, self.floor)
        floor = self.floor
        cache = {}
        if sampled is not None:
            cached = verify_cache(self.engine, sampled, seed=self.config.seed + 1)
            cache = {"cache": cached.to_dict() | {"ok": judge(cached, self.tolerance, self.cache_floor).ok}}
        return cache | {
            "weights": weights.to_dict(),
            "logprob": check.to_dict() | {
                "ok": verdict.ok,
                "mean_ratio": _ratio(check.mean_abs_diff, floor.mean_abs_diff),
                "quantile_ratio": _ratio(check.quantile_abs_diff, floor.quantile_abs_diff),
                "max_ratio": _ratio(check.max_abs_diff, floor.max_abs_diff),
            },
        }

    def entry(self, sync: WeightSync, checkpoint: str):
        return next(e for e in sync.plan.full if e.checkpoint == checkpoint)


def _ratio(value: float, floor: float) -> float:
    if floor > 0:
        return value / floor
    return float("inf") if value > 0 else 1.0


# ---- running and summing up


def run_verdict_bench(config: VerdictBenchConfig, progress: bool = True) -> dict:
    """Every case on one engine in `config.dtype`; the JSON-ready result."""
    result: dict = {
        "command": "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
        + config.command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine.describe(),
        "config": asdict(config),
        "step_std": STEP_STD,
    }
    engine = ColocatedEngine(EngineConfig(model=config.model, dtype=config.dtype, seed=config.seed))
    try:
        bench = Bench(config, engine)
        todo = cases(config.trained)
        bar = tqdm(total=len(todo) + 1, desc="bench verdict", disable=not progress)
        bar.set_postfix(case="floor")
        bench.measure_floor(bench.policy(0.0))
        bar.update()
        rows = []
        for index, case in enumerate(todo):
            bar.set_postfix(case=case.name)
            gen = torch.Generator().manual_seed(config.seed + 1 + index)
            rows.append(summarize(case, case.run(bench, gen)))
            gc.collect()  # the case's policy model
            bar.update()
        bar.close()
    finally:
        engine.close()
    verdict = judge(bench.floor, bench.tolerance, bench.floor)
    result |= {
        "probes": {"sequences": len(bench.probes), "tokens": bench.floor.tokens,
                   "task_sequences": TASK_PROMPTS, "task_tokens": TASK_TOKENS},
        "floor": bench.floor.to_dict(),
        "cache_floor": bench.cache_floor.to_dict(),
        "tolerance": bench.tolerance,
        "bounds": {"mean": verdict.mean_bound, "quantile": verdict.quantile_bound,
                   "mean_factor": MEAN_FACTOR, "quantile_factor": QUANTILE_FACTOR, "level": QUANTILE},
        "cases": rows,
        "all_right": all(row["right"] for row in rows),
    }
    return result
