"""The cases `lorasync bench verdict` runs (`verdict.py` runs them): right syncs, which
must pass both levels of the verdict after every sync, and broken ones, each caught by at least
one level.

Each case takes the shared `Bench` (its engine, floor and probes) and a seeded generator and
returns the verdicts it measured, one per sync or one. Right syncs by streaming run `--syncs`
syncs, the LoRA factors moved between two by `STEP_STD`, as a training step would (one Adam step
at lr 3e-4 moves each element by about that). Broken cases start from a right sync of a random
adapter (std `RANDOM_STD`) and break it once. Every case begins with a new `WeightSync`, whose
first sync is a full one, so no case inherits another's weights.

The two generation cases are judged at the level training's health check uses: the engine's
sampling logprobs on its own completions against the trainer's. Prompt-logprob scoring never
reads the prefix cache (vLLM sets `skip_reading_prefix_cache` for such requests), so only
generation can see a cache that a sync left stale. vLLM caches whole blocks (128 tokens on CPU),
so their prompts are longer than a block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from lorasync.sync.base import Strategy
from lorasync.sync.merged_weight import MergedWeight
from lorasync.sync.policy import load_policy
from lorasync.sync.weight_sync import WeightSync

if TYPE_CHECKING:
    from lorasync.bench.verdict import Bench

# What a training step does to the LoRA factors between two syncs: N(0, STEP_STD) per element.
STEP_STD = 3e-4
# The random adapter's factors (and the broken cases' policy): PEFT's init plus N(0, RANDOM_STD).
RANDOM_STD = 0.01


@torch.no_grad()
def perturb(params, gen: torch.Generator, std: float = STEP_STD) -> None:
    """Add N(0, std) to each tensor in place (a training step's change, as far as a sync sees)."""
    for param in params:
        param.add_((torch.randn(param.shape, generator=gen) * std).to(param.dtype))


def lora_factors(model: PeftModel) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


# ---- right ones


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


def _generation_after_a_sync(bench: Bench, gen: torch.Generator, reset: bool) -> list[dict]:
    """The engine serves the checkpoint and generates from the long prompts (their first blocks
    cached), the policy moves to a random adapter and is synced, resetting the cache or not;
    then judged on the engine's sampling logprobs from the same prompts. The move is a whole
    run's, not a step's: a prompt prefix every request shares (a system prompt) stays cached
    from the first step on when no sync resets it."""
    sync = WeightSync(bench.policy(0.0), bench.engine, Strategy.STREAMING)
    sync()
    bench.engine.generate(bench.long_prompts, 4, seed=bench.config.seed)
    perturb(lora_factors(sync.model), gen, RANDOM_STD)
    llm = bench.engine.llm
    if not reset:
        llm.reset_prefix_cache = lambda *args, **kwargs: True  # the sync's reset does nothing
    try:
        sync()
    finally:
        llm.__dict__.pop("reset_prefix_cache", None)
    return [bench.measure(sync, sampled=bench.long_prompts)]


def generation_after_a_sync(bench: Bench, gen: torch.Generator) -> list[dict]:
    return _generation_after_a_sync(bench, gen, reset=True)


# ---- broken ones: a right streaming sync of the random adapter, then one thing wrong


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


def stale_prefix_cache(bench: Bench, gen: torch.Generator) -> list[dict]:
    return _generation_after_a_sync(bench, gen, reset=False)


@dataclass(frozen=True)
class Case:
    name: str
    expected: str  # "correct" or "broken"
    run: Callable[[Bench, torch.Generator], list[dict]]
    note: str


def cases(trained: str | None) -> list[Case]:
    """Every case, in the order they run; "trained adapter" where `trained` names an adapter."""
    step = f"N(0, {STEP_STD:g})"
    generation = ("judged on sampling logprobs: the checkpoint generated from prompts longer than "
                  f"a cache block, then a random adapter (std {RANDOM_STD:g}) synced")
    right = [
        Case("zero adapter", "correct", zero_adapter,
             f"streaming; lora_B = 0 at the first sync, then {step} on every factor before each sync"),
        Case(f"random adapter (std {RANDOM_STD:g})", "correct", random_adapter,
             f"streaming; {step} on every factor before each later sync"),
    ]
    if trained is not None:
        right.append(Case("trained adapter", "correct", trained_adapter,
                          f"streaming; {trained}, {step} on every factor before each later sync"))
    right += [
        Case("merge-unmerge", "correct", merge_unmerge,
             "random adapter, one sync by PEFT's in-place merge: weights judged within the merge's rounding"),
        Case("generation after a sync", "correct", generation_after_a_sync,
             f"{generation}, the sync resetting the prefix cache"),
    ]
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
        Case("stale prefix cache", "broken", stale_prefix_cache,
             f"{generation}, the sync's prefix-cache reset skipped (the weights are right; the "
             "cached keys/values are the checkpoint's)"),
    ]
    return right + broken
