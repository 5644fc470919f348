"""`lorasync bench sync`: the sync strategies side by side in one process, with ratios.

The machine is shared and noisy, so absolute seconds drift between runs; the ratios, taken
within one run on the same engine and trainer, are the result. The floor is a bare vLLM
in-place reload of exactly the tensors the changed-only plan sends, made beforehand: what a
sync would cost if merging were free.

The `adapter` strategy runs first, while the engine still holds the checkpoint's weights it
needs; right after it, the same prompts are decoded greedily with and without the adapter,
which gives the decode cost each kind of strategy pays per token, and `auto`'s choice for
the decoded tokens per step.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from lorasync.adapter_sync import (
    ADAPTER,
    MERGED,
    Measurements,
    choose_strategy,
    decode_seconds_per_token,
)
from lorasync.adapters import randomize_trainable
from lorasync.engine import DTYPES, ColocatedEngine, EngineConfig
from lorasync.merge import merged_tensor
from lorasync.sync import STRATEGIES, WeightSync
from lorasync.tiny import ARCHITECTURES, SHAPES, make_tiny_model
from lorasync.verify import base_weight_change, probe_sequences, verify

# The decode comparison: this many prompts, each decoding this many tokens greedily (the
# 8 x 32 batch of ../shared/research/vllm-cpu-findings.md).
DECODE_PROMPTS, DECODE_PROMPT_TOKENS, DECODE_TOKENS = 8, 16, 32


@dataclass
class BenchConfig:
    arch: str = "qwen2"
    shape: str = "0.5b"
    dtype: str = "bfloat16"
    rank: int = 16
    targets: tuple[str, ...] = ("all-linear",)
    repeats: int = 5
    cache_dir: str = "runs/bench"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.rank < 1 or self.repeats < 1:
            raise ValueError(f"--rank and --repeats must be >= 1, got {self.rank}, {self.repeats}")


class PeakRSS:
    """Samples this process's resident memory in a thread; `extra` is the peak above the start."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.process = psutil.Process()

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _measure(run: Callable[[], object], repeats: int) -> dict:
    """Time `run` `repeats` times, tracking the peak extra memory of any one call."""
    seconds, peaks = [], []
    for _ in range(repeats):
        with PeakRSS() as rss:
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        peaks.append(rss.extra)
    return {
        "min_s": min(seconds),
        "median_s": statistics.median(seconds),
        "peak_extra_bytes": max(peaks),
    }


def bench_model_dir(config: BenchConfig) -> Path:
    out = Path(config.cache_dir) / f"{config.arch}-{config.shape}-{config.dtype}"
    if not (out / "model.safetensors").is_file():
        make_tiny_model(
            out,
            config.arch,
            SHAPES[config.shape],
            tie_word_embeddings=True,
            dtype=DTYPES[config.dtype],
            init_std=0.02,
        )
    return out


def run_bench(config: BenchConfig, progress: bool = True) -> dict:
    """Measure each strategy and the floor; return the JSON-ready result."""
    model_dir = bench_model_dir(config)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[config.dtype])
    targets = config.targets[0] if config.targets == ("all-linear",) else list(config.targets)
    trainer = get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=2 * config.rank, target_modules=targets))
    randomize_trainable(trainer, seed=0, std=0.02)
    engine = ColocatedEngine(
        EngineConfig(
            model=str(model_dir),
            dtype=config.dtype,
            max_model_len=256,
            enable_lora=True,
            max_lora_rank=max(16, config.rank),
        )
    )
    result: dict = {"config": config.__dict__ | {"targets": list(config.targets)}, "strategies": {}}
    try:
        bar = tqdm(total=len(STRATEGIES) + 2, desc="bench sync", disable=not progress)
        # adapter first (it needs the checkpoint's weights in the engine), then streaming:
        # merge-unmerge drifts the trainer's base weights in low precision
        for strategy in (ADAPTER, *STRATEGIES):
            sync = WeightSync(trainer, engine, strategy)
            sync()  # the first sync sends everything; steady state is what a step pays
            reports = []
            stats = _measure(lambda: reports.append(sync()), config.repeats)
            result["strategies"][strategy] = stats | {
                "bytes_sent": reports[-1].bytes_sent,
                "tensors_sent": reports[-1].tensors_sent,
                "max_abs_logprob_diff": verify(trainer, engine, probe_sequences(engine.vocab_size, n=2)).max_abs_diff,
                "base_max_abs_change": base_weight_change(trainer, model_dir),
                "syncs": config.repeats + 1,
            }
            if strategy == ADAPTER:
                result["decode"] = _decode(engine)
            bar.update()
        plan = sync.plan
        tensors = [
            (e.checkpoint, merged_tensor(trainer, e, plan.adapter_name).to(engine.dtype).clone())
            for e in plan.changed
        ]
        floor = _measure(lambda: engine.load_weights(iter(tensors)), config.repeats)
        result["floor"] = floor | {"bytes_sent": sum(t.numel() * t.element_size() for _, t in tensors)}
        result["largest_tensor_bytes"] = max(t.numel() * t.element_size() for _, t in tensors)
        bar.update()
        bar.close()
    finally:
        engine.close()
    default, baseline = result["strategies"]["streaming"], result["strategies"]["merge-unmerge"]
    measured = Measurements(
        sync_seconds={s: result["strategies"][s]["median_s"] for s in (MERGED, ADAPTER)},
        decode_seconds_per_token={
            MERGED: result["decode"]["merged_s_per_token"],
            ADAPTER: result["decode"]["adapter_s_per_token"],
        },
    )
    result["auto"] = choose_strategy(measured, result["decode"]["tokens"]).to_dict()
    result["speedup_vs_merge_unmerge"] = baseline["median_s"] / default["median_s"]
    result["ratio_to_floor"] = default["median_s"] / result["floor"]["median_s"]
    return result


def _decode(engine: ColocatedEngine) -> dict:
    """Greedy decoding of the same prompts with the adapter and without (the engine's weights
    alone: what a merged sync decodes with), best of two batches each."""
    prompts = probe_sequences(engine.vocab_size, n=DECODE_PROMPTS, length=DECODE_PROMPT_TOKENS)
    seconds = {
        use_adapter: min(
            decode_seconds_per_token(engine, prompts, DECODE_TOKENS, use_adapter)
            for _ in range(2)  # the first batch warms up
        )
        for use_adapter in (True, False)
    }
    return {
        "prompts": DECODE_PROMPTS,
        "tokens": DECODE_PROMPTS * DECODE_TOKENS,
        "merged_s_per_token": seconds[False],
        "adapter_s_per_token": seconds[True],
        "merged_over_adapter_throughput": seconds[True] / seconds[False],
    }


def format_table(result: dict) -> str:
    """A plain-text table of the benchmark, one row per strategy plus the floor."""
    floor = result["floor"]
    rows = [("strategy", "min s", "median s", "MB sent", "tensors", "peak extra MB", "x floor")]
    for name, s in list(result["strategies"].items()) + [("floor (reload only)", floor)]:
        rows.append(
            (
                name,
                f"{s['min_s']:.3f}",
                f"{s['median_s']:.3f}",
                f"{s['bytes_sent'] / 1e6:.1f}",
                str(s.get("tensors_sent", "")),
                f"{s['peak_extra_bytes'] / 1e6:.1f}",
                f"{s['median_s'] / floor['median_s']:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    s = result["strategies"]
    lines += [
        "",
        f"streaming vs merge-unmerge: {result['speedup_vs_merge_unmerge']:.2f}x faster (medians)",
        f"streaming vs floor: {result['ratio_to_floor']:.2f}x",
        f"largest single tensor sent: {result['largest_tensor_bytes'] / 1e6:.1f} MB",
        "base weights changed after "
        + ", ".join(f"{n} ({v['syncs']} syncs): {v['base_max_abs_change']:.3g}" for n, v in s.items()),
        "max |logprob diff| after syncing: "
        + ", ".join(f"{n}: {v['max_abs_logprob_diff']:.3g}" for n, v in s.items()),
    ]
    decode, auto = result["decode"], result["auto"]
    lines += [
        f"greedy decode, {decode['prompts']} prompts x {decode['tokens'] // decode['prompts']} "
        f"tokens: merged {1000 * decode['merged_s_per_token']:.2f} ms/token, adapter "
        f"{1000 * decode['adapter_s_per_token']:.2f} ms/token (merged decodes "
        f"{decode['merged_over_adapter_throughput']:.2f}x as fast)",
        f"auto for {auto['tokens_per_step']} tokens per step: {auto['strategy']} "
        + "("
        + ", ".join(f"{n} {v:.3f} s/step" for n, v in auto["seconds_per_step"].items())
        + "); merged wins above "
        + (
            f"{auto['break_even_tokens']:.0f} tokens per step"
            if auto["break_even_tokens"] is not None
            else "no token count"
        ),
    ]
    return "\n".join(lines)
