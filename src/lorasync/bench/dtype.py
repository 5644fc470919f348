"""`lorasync bench dtype`: float32 against bfloat16 on this machine, for the two hot paths a
training step runs besides the sync: the trainer's forward and backward (LoRA on every
linear layer) and vLLM's greedy decode.

On a CPU without native bf16 matrix instructions (AVX2) torch's bf16 GEMM falls back to a
slow kernel, so bf16, the usual default, may be the slower choice there. This measures both
dtypes side by side in one process and prints the ratios, with the machine they ran on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from lorasync import machine
from lorasync.bench.sync import DECODE_PROMPT_TOKENS, DECODE_PROMPTS, DECODE_TOKENS, BenchConfig, bench_model_dir
from lorasync.engines.colocated import ColocatedEngine, EngineConfig
from lorasync.sync.policy import AdapterSpec, attach_random_adapter
from lorasync.sync.verify import probe_sequences

COMPARED = ("float32", "bfloat16")


@dataclass
class DtypeBenchConfig:
    arch: str = "qwen2"
    shape: str = "0.5b"
    rank: int = 16
    batch: int = 2  # sequences per training step
    tokens: int = 64  # tokens per sequence
    repeats: int = 2

    def __post_init__(self) -> None:
        BenchConfig(arch=self.arch, shape=self.shape, rank=self.rank, repeats=self.repeats)  # same rules
        if self.batch < 1 or self.tokens < 2:
            raise ValueError(f"--batch must be >= 1 and --tokens >= 2, got {self.batch}, {self.tokens}")


def run_dtype_bench(config: DtypeBenchConfig, progress: bool = True) -> dict:
    """Seconds per training step and per decoded token in each dtype; the JSON-ready result."""
    model_dir = bench_model_dir(BenchConfig(arch=config.arch, shape=config.shape, rank=config.rank))
    result: dict = {"config": dict(config.__dict__), "machine": machine.describe(), "dtypes": {}}
    bar = tqdm(total=2 * len(COMPARED), desc="bench dtype", disable=not progress)
    for dtype in COMPARED:
        result["dtypes"][dtype] = {"train_step_s": _train_step(model_dir, dtype, config)}
        bar.update()
        result["dtypes"][dtype]["decode_s_per_token"] = _decode(model_dir, dtype)
        bar.update()
    bar.close()
    f32, bf16 = (result["dtypes"][d] for d in COMPARED)
    result["bf16_over_fp32"] = {k: bf16[k] / f32[k] for k in f32}
    return result


def _train_step(model_dir, dtype: str, config: DtypeBenchConfig) -> float:
    """Median seconds of one forward and backward of a LoRA policy over a batch (after one
    warm-up step)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = attach_random_adapter(base, AdapterSpec(targets=["all-linear"], rank=config.rank, init_std=0.02))
    model.train()
    ids = torch.randint(0, base.config.vocab_size, (config.batch, config.tokens), generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(config.repeats + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def _decode(model_dir, dtype: str) -> float:
    """Seconds per token of greedy decoding (bench sync's batch), best of two batches."""
    engine = ColocatedEngine(EngineConfig(model=str(model_dir), dtype=dtype, max_model_len=256))
    try:
        prompts = probe_sequences(engine.vocab_size, n=DECODE_PROMPTS, length=DECODE_PROMPT_TOKENS)
        return min(engine.decode_seconds_per_token(prompts, DECODE_TOKENS, use_adapter=False) for _ in range(2))
    finally:
        engine.close()


def format_dtypes(result: dict) -> str:
    m, d, ratio = result["machine"], result["dtypes"], result["bf16_over_fp32"]
    c = result["config"]
    lines = [
        f"machine: {m['cpu_model']}, torch ISA {m['cpu_capability']} ({' '.join(m['isa_flags'])}"
        f"{', capped ' + str(m['isa_caps']) if m['isa_caps'] else ''}), {m['torch_threads']} threads",
        f"{'dtype':<10} {'train step s':>13} {'decode ms/token':>16}   "
        f"({c['arch']} {c['shape']}, LoRA r={c['rank']} all-linear, {c['batch']}x{c['tokens']} tokens)",
    ]
    for name, r in d.items():
        lines.append(f"{name:<10} {r['train_step_s']:>13.3f} {1000 * r['decode_s_per_token']:>16.2f}")
    lines.append(
        f"bfloat16 / float32: train step {ratio['train_step_s']:.2f}x, decode {ratio['decode_s_per_token']:.2f}x"
        " (above 1: bfloat16 is slower here)"
    )
    return "\n".join(lines)
