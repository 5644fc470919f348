"""`lorasync bench verdict`: does the sync verdict pass right syncs and catch broken ones, at
both of its levels?

One colocated engine in one dtype; the verdict's floor is measured once on it before any sync
(engine version 0, the trainer's adapter disabled), on `verify.verdict_probes`: the random
probe sets plus `TASK_PROMPTS` arith prompts with the engine's own sampled completions. Then
each case syncs a policy into the same engine and runs the verdict at both levels: the weight
level (`weight_check.check_weights`: what the engine reads back against what the policy gives)
and the logprob level (`verify.verify`, judged by `verify.judge` against the floor).

Right syncs (`correct`) must pass both levels after every sync; broken ones must be caught by
at least one level. Right syncs by streaming run `--syncs` syncs each, the LoRA factors moved
between syncs by `STEP_STD` as a training step would (one Adam step at lr 3e-4 moves each
element by about that); the verdict runs after every sync and every failure is a false
alarm. The broken cases start from a right sync of a random adapter (std `RANDOM_STD`) and
break it once, by the same step size where a change is needed. Every case starts with a new
`WeightSync`, whose first sync is a full one: whatever the case before left in the engine is
overwritten, so cases do not leak into each other.

A stale prefix cache is no case here: the logprob level scores with prompt logprobs, and vLLM
never reads the prefix cache for such a request (`SamplingParams.skip_reading_prefix_cache`),
so a stale cache cannot move what the verdict scores; it changes generation only
(`PREFIX_CACHE_NOTE`).

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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasync import machine
from lorasync.checkpoint import DTYPES, check_dtype
from lorasync.engines.colocated import ColocatedEngine, EngineConfig
from lorasync.sync.base import Strategy
from lorasync.sync.merged_weight import MergedWeight
from lorasync.sync.policy import AdapterSpec, attach_random_adapter, find_adapter, load_policy
from lorasync.sync.verify import (
    MEAN_FACTOR,
    QUANTILE,
    QUANTILE_FACTOR,
    Verification,
    default_tolerance,
    judge,
    measure_floor,
    verdict_probes,
    verify,
)
from lorasync.sync.weight_check import check_weights
from lorasync.sync.weight_sync import WeightSync
from lorasync.tasks import arith
from lorasync.train.data import encode_prompt
from lorasync.commands.verdict_report import git_commit, summarize

# What a training step does to the LoRA factors between two syncs: N(0, STEP_STD) per element.
STEP_STD = 3e-4
# The random adapter's factors (and the broken cases' policy): PEFT's init plus N(0, RANDOM_STD).
RANDOM_STD = 0.01
# The task's own sequences in the probes: this many arith prompts, each with one completion of
# TASK_TOKENS tokens sampled by the engine from the checkpoint.
TASK_PROMPTS, TASK_TOKENS = 8, 16
SMOLLM2 = "smollm2-135m-instruct"
PREFIX_CACHE_NOTE = (
    "stale prefix cache: not a case. The logprob level scores with prompt logprobs, and vLLM "
    "skips reading the prefix cache for any request that asks for them "
    "(SamplingParams.skip_reading_prefix_cache), so a stale cache cannot move what the verdict "
    "scores, and the weight level reads weights, not the cache: neither level can see it. A "
    "stale cache changes generation only; load_weights resets it on every sync."
)


def default_model() -> str:
    """The SmolLM2-135M-Instruct folder `lorasync get-model` makes in the cache (as the tests'
    `smollm2` fixture does)."""
    from lorasync.models.registry import cache_dir

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

    def policy(self, std: float, modules_to_save: tuple[str, ...] = ()) -> PeftModel:
        """The base model in the bench's dtype with a LoRA adapter on every linear layer: PEFT's
        init (lora_B zero) plus N(0, std) on every trainable tensor."""
        base = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=DTYPES[self.config.dtype])
        spec = AdapterSpec(rank=self.config.rank, init_std=std, seed=self.config.seed,
                           modules_to_save=list(modules_to_save))
        return attach_random_adapter(base, spec)

    def measure(self, sync: WeightSync) -> dict:
        """Both levels of the verdict on what the engine serves now."""
        weights = check_weights(sync)
        if weights is None:
            raise RuntimeError("the engine cannot read its weights back (WeightReader)")
        check = verify(sync.model, self.engine, self.probes)
        verdict = judge(check, self.tolerance, self.floor)
        floor = self.floor
        return {
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


@torch.no_grad()
def perturb(params, gen: torch.Generator, std: float = STEP_STD) -> None:
    """Add N(0, std) to each tensor in place (a training step's change, as far as a sync sees)."""
    for param in params:
        param.add_((torch.randn(param.shape, generator=gen) * std).to(param.dtype))


def lora_factors(model: PeftModel) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


# ---- the cases: each returns the verdicts it measured (one per sync, or one)
# Right ones.


def _trained_over_syncs(bench: Bench, model: PeftModel, gen: torch.Generator) -> list[dict]:
    """`--syncs` streaming syncs, the factors moved by a step between two; verified after each."""
    sync = WeightSync(model, bench.engine, Strategy.STREAMING)
    measures = []
    for i in range(bench.config.syncs):
        if i:
            perturb(lora_factors(model), gen)
        sync()
        measures.append(bench.measure(sync))
    return measures


def zero_adapter(bench: Bench, gen: torch.Generator) -> list[dict]:
    return _trained_over_syncs(bench, bench.policy(0.0), gen)


def random_adapter(bench: Bench, gen: torch.Generator) -> list[dict]:
    return _trained_over_syncs(bench, bench.policy(RANDOM_STD), gen)


def trained_adapter(bench: Bench, gen: torch.Generator) -> list[dict]:
    model = load_policy(bench.config.model, bench.config.trained, bench.config.dtype)
    return _trained_over_syncs(bench, model, gen)


def merge_unmerge(bench: Bench, gen: torch.Generator) -> list[dict]:
    sync = WeightSync(bench.policy(RANDOM_STD), bench.engine, Strategy.MERGE_UNMERGE)
    sync()
    return [bench.measure(sync)]


# Broken ones: a right streaming sync of the random adapter, then one thing wrong.


def _synced(bench: Bench, model: PeftModel | None = None) -> WeightSync:
    sync = WeightSync(model or bench.policy(RANDOM_STD), bench.engine, Strategy.STREAMING)
    sync()
    return sync


def skipped_sync(bench: Bench, gen: torch.Generator) -> list[dict]:
    sync = _synced(bench)
    perturb(lora_factors(sync.model), gen)  # a step, and no sync after it
    return [bench.measure(sync)]


def stale_tensor(bench: Bench, gen: torch.Generator) -> list[dict]:
    sync = _synced(bench)
    layer = sync.merger.find(bench.entry(sync, bench.q_projs[bench.middle]))
    perturb([layer.lora_B[sync.plan.adapter_name].weight], gen)  # changed after the sync
    return [bench.measure(sync)]


def wrong_scale(bench: Bench, gen: torch.Generator) -> list[dict]:
    """Synced with alpha / sqrt(r) (rsLoRA's scaling) where the trainer computes alpha / r."""
    model = bench.policy(RANDOM_STD)
    name = model.active_adapter
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.scaling]
    right = [layer.scaling[name] for layer in layers]
    alpha, rank = model.peft_config[name].lora_alpha, model.peft_config[name].r
    for layer in layers:
        layer.scaling[name] = alpha / rank**0.5
    try:
        sync = _synced(bench, model)
    finally:
        for layer, scale in zip(layers, right):
            layer.scaling[name] = scale
    return [bench.measure(sync)]


def swapped_layers(bench: Bench, gen: torch.Generator) -> list[dict]:
    """Two adjacent layers' merged q_proj weights loaded into each other's place, each with its
    own layer's k/v (the whole fused q/k/v groups, as vLLM's in-place reload needs)."""
    sync = _synced(bench)
    a, b = bench.q_projs[bench.middle], bench.q_projs[bench.middle + 1]
    swap = {a: b, b: a}
    groups = [g for g in bench.engine.weight_groups() if a in g or b in g]
    dtype = bench.engine.dtype

    def value(name: str) -> torch.Tensor:
        tensor = sync.merger(bench.entry(sync, swap.get(name, name)))
        tensor = tensor.materialize() if isinstance(tensor, MergedWeight) else tensor
        return tensor.to(dtype)

    bench.engine.load_weights((name, value(name)) for group in groups for name in group)
    return [bench.measure(sync)]


def stale_head(bench: Bench, gen: torch.Generator) -> list[dict]:
    """modules_to_save=["lm_head"] (with a tied embedding, one copy trained as both, PEFT's
    ensure_weight_tying): the copy changed by a step after the sync."""
    sync = _synced(bench, bench.policy(RANDOM_STD, modules_to_save=("lm_head",)))
    saved = [p for n, p in sync.model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    perturb(saved, gen)
    return [bench.measure(sync)]


@dataclass(frozen=True)
class Case:
    name: str
    expected: str  # "correct" or "broken"
    run: Callable[[Bench, torch.Generator], list[dict]]
    note: str


def cases(config: VerdictBenchConfig) -> list[Case]:
    step = f"N(0, {STEP_STD:g})"
    right = [
        Case("zero adapter", "correct", zero_adapter,
             f"streaming; lora_B = 0 at the first sync, then {step} on every factor before each sync"),
        Case(f"random adapter (std {RANDOM_STD:g})", "correct", random_adapter,
             f"streaming; {step} on every factor before each later sync"),
    ]
    if config.trained is not None:
        right.append(Case("trained adapter", "correct", trained_adapter,
                          f"streaming; {config.trained}, {step} on every factor before each later sync"))
    right.append(Case("merge-unmerge", "correct", merge_unmerge,
                      "random adapter, one sync by PEFT's in-place merge: weights judged within the merge's rounding"))
    broken = [
        Case("skipped sync", "broken", skipped_sync, f"{step} on every factor after the sync, not synced"),
        Case("stale tensor", "broken", stale_tensor,
             f"{step} on one layer's q_proj lora_B after the sync (the engine holds the old one)"),
        Case("wrong scale", "broken", wrong_scale, "synced with scaling alpha/sqrt(r) instead of alpha/r"),
        Case("swapped layers", "broken", swapped_layers,
             "two adjacent layers' merged q_proj loaded into each other's place (whole q/k/v groups)"),
        Case("stale lm_head", "broken", stale_head,
             "modules_to_save=['lm_head'] (tied embeddings: one copy, served as both); "
             f"{step} on it after the sync"),
    ]
    return right + broken


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
        "notes": [PREFIX_CACHE_NOTE],
    }
    engine = ColocatedEngine(EngineConfig(model=config.model, dtype=config.dtype, seed=config.seed))
    try:
        bench = Bench(config, engine)
        todo = cases(config)
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
        "tolerance": bench.tolerance,
        "bounds": {"mean": verdict.mean_bound, "quantile": verdict.quantile_bound,
                   "mean_factor": MEAN_FACTOR, "quantile_factor": QUANTILE_FACTOR, "level": QUANTILE},
        "cases": rows,
        "all_right": all(row["right"] for row in rows),
    }
    return result
