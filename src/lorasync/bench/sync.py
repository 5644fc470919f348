"""`lorasync bench sync`: the sync strategies side by side in one process, with ratios.

The machine is shared and noisy, so absolute seconds drift between runs; the ratios, taken
within one run on the same engine and trainer, are the result. The floor is a bare vLLM
in-place reload of exactly the tensors the changed-only plan sends, made beforehand: what a
sync would cost if merging were free.

The `adapter` strategy runs first, while the engine still holds the checkpoint's weights it
needs; right after it, the same prompts are decoded greedily with and without the adapter,
which gives the decode cost each kind of strategy pays per token, and `auto`'s choice for
the decoded tokens per step. Then streaming, merge-unmerge and the floor take turns, one
call of each per round, so that the machine's drift (runs here differ by up to 30%) falls
on all three alike; merge-unmerge works on its own copy of the trainer, whose base weights
it drifts. Streaming runs twice: with the merge kernel measured fastest here (the default,
`sync/merge_kernel.py`) and forced to the other one, so both paths are measured on any CPU.

The result records the machine (`machine.describe`) and a roofline: the merge kernel alone
over the changed tensors, in GFLOP/s beside a plain float32 GEMM's rate and against copying
the same tensors. To measure a CPU without native bf16 GEMM on one that has it, cap the ISA:
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 lorasync bench sync`.
The cap does not reach torch's AMX probe: on an AMX CPU a bfloat16 engine still picks vLLM's
AMX kernel under it and aborts in torch's capped brgemm (tests/engines/test_cpu_paths.py
emulates the whole CPU); float32 is unaffected.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from lorasync import machine
from lorasync.served_model import DTYPES, check_dtype
from lorasync.models.tiny import ARCHITECTURES, SHAPES, make_tiny_model
from lorasync.engines.colocated import ColocatedEngine, EngineConfig
from lorasync.sync.auto import ADAPTER, STREAMING, Measurements, choose_strategy
from lorasync.sync.merge_kernel import Kernel
from lorasync.sync.merged_weight import MergedWeight
from lorasync.sync.policy import MAX_LORA_RANK, AdapterSpec, attach_random_adapter
from lorasync.sync.verify import base_weight_change, probe_sequences, verify
from lorasync.sync.weight_sync import WeightSync

# The decode comparison: this many prompts, each decoding this many tokens greedily (the
# 8 x 32 batch of ../shared/research/vllm-cpu-findings.md).
DECODE_PROMPTS, DECODE_PROMPT_TOKENS, DECODE_TOKENS = 8, 16, 32
# Syncs in a row over whose peaks each strategy's peak extra memory is the median.
MEMORY_REPEATS = 5


@dataclass
class BenchConfig:
    arch: str = "qwen2"
    shape: str = "0.5b"
    dtype: str = "bfloat16"
    rank: int = 16
    targets: tuple[str, ...] = ("all-linear",)
    repeats: int = 10
    cache_dir: str = "runs/bench"
    model: str = ""  # a model folder to measure instead of a random model of arch/shape

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        check_dtype(self.dtype, "--dtype")
        if self.rank < 1 or self.repeats < 1:
            raise ValueError(f"--rank and --repeats must be >= 1, got {self.rank}, {self.repeats}")


class PeakRSS:
    """The peak resident memory of this process inside the block, above its start (`extra`).

    Read from the kernel's high-water mark (VmHWM), reset on entry through
    /proc/self/clear_refs: exact, and free. A sampling thread misses short peaks and, on this
    2-core machine, slowed the Python-heavy streaming loop it was measuring.
    """

    def __enter__(self) -> PeakRSS:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak to the current RSS
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _status_kib("VmHWM")

    @property
    def extra(self) -> int:
        return (self.peak - self.start) * 1024


def _status_kib(field: str) -> int:
    """One memory field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (lorasync bench needs Linux)")


def _measure(runs: dict[str, Callable[[], object]], repeats: int, bar: tqdm) -> dict[str, dict]:
    """Time each of `runs` `repeats` times, taking turns (one call of each per round) so that
    the machine's drift falls on all of them alike.

    Then the peak extra memory of each: the median, over `MEMORY_REPEATS` calls in a row after
    one more, of each call's peak resident memory above its start; what a training loop that
    syncs the same way every step sees. Single calls vary by up to ~70 MB either way, the C
    allocator's doing (the floor's too); measured in turns, the ~600 MB merge-unmerge frees
    moved the next call's peak by up to ~200 MB.
    """
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            bar.update()
    stats = {}
    for name, run in runs.items():
        run()
        peaks = []
        for _ in range(MEMORY_REPEATS):
            with PeakRSS() as rss:
                run()
            peaks.append(rss.extra)
        bar.update()
        stats[name] = {
            "min_s": min(seconds[name]),
            "median_s": statistics.median(seconds[name]),
            "peak_extra_bytes": statistics.median(peaks),
        }
    return stats


def bench_policy(model_dir: Path, config: BenchConfig) -> PeftModel:
    """The benchmark's trainer: the model with a random LoRA adapter of the configured shape."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[config.dtype])
    spec = AdapterSpec(targets=list(config.targets), rank=config.rank, init_std=0.02)
    return attach_random_adapter(base, spec)


def bench_model_dir(config: BenchConfig) -> Path:
    """The model folder measured: `config.model`, or a random one of the configured
    architecture and shape, made once under `cache_dir`."""
    if config.model:
        return Path(config.model)
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
    trainer = bench_policy(model_dir, config)
    engine = ColocatedEngine(
        EngineConfig(
            model=str(model_dir),
            dtype=config.dtype,
            max_model_len=256,
            enable_lora=True,
            max_lora_rank=max(MAX_LORA_RANK, config.rank),
        )
    )
    result: dict = {
        "config": config.__dict__ | {"targets": list(config.targets)},
        "machine": machine.describe(),
        "strategies": {},
    }
    bar = tqdm(total=5 * (config.repeats + 1), desc="bench sync", disable=not progress)
    try:
        # The adapter goes first and alone: it is served on the checkpoint's weights, which the
        # merged strategies overwrite.
        adapter = WeightSync(trainer, engine, ADAPTER)
        adapter()  # the first sync of a new adapter warms up vLLM's LoRA path
        stats = _measure({ADAPTER: adapter}, config.repeats, bar)
        result["strategies"][ADAPTER] = stats[ADAPTER] | _checked(adapter, engine, model_dir)
        result["decode"] = _decode(engine)
        # merge-unmerge drifts its trainer's base weights in low precision: it gets a copy, so
        # that each strategy's base-weight change is its own.
        streaming = WeightSync(trainer, engine, "streaming")  # the kernel measured fastest
        other = next(k for k in Kernel if k is not streaming.kernel.kernel)
        syncs = {
            "streaming": streaming,
            f"streaming:{other.value}": WeightSync(trainer, engine, "streaming", merge_kernel=other),
            "merge-unmerge": WeightSync(copy.deepcopy(trainer), engine, "merge-unmerge"),
        }
        for sync in syncs.values():
            sync()  # the first sync sends everything; steady state is what a step pays
        tensors = [
            (e.checkpoint, streaming.merger(e).to(engine.dtype).clone()) for e in streaming.plan.changed
        ]
        stats |= _measure(
            syncs
            | {"floor": lambda: engine.load_weights(iter(tensors))},
            config.repeats,
            bar,
        )
        bar.close()
        for name, sync in syncs.items():
            result["strategies"][name] = stats[name] | _checked(sync, engine, model_dir)
        result["floor"] = stats["floor"] | {"bytes_sent": sum(t.numel() * t.element_size() for _, t in tensors)}
        result["largest_tensor_bytes"] = max(t.numel() * t.element_size() for _, t in tensors)
        result["merge_kernel"] = {"kernel": streaming.kernel.kernel.value, "measured_s": streaming.kernel.seconds}
        result["roofline"] = {
            kernel.value: _roofline(streaming, kernel) for kernel in Kernel
        } | {"float32_gemm_gflops": machine.float32_gemm_gflops()}
    finally:
        engine.close()
    default, baseline = result["strategies"]["streaming"], result["strategies"]["merge-unmerge"]
    measured = Measurements(
        sync_seconds={s: result["strategies"][s]["median_s"] for s in (STREAMING, ADAPTER)},
        decode_seconds_per_token={
            STREAMING: result["decode"]["merged_s_per_token"],
            ADAPTER: result["decode"]["adapter_s_per_token"],
        },
    )
    result["auto"] = choose_strategy(measured, result["decode"]["tokens"]).to_dict()
    result["speedup_vs_merge_unmerge"] = baseline["median_s"] / default["median_s"]
    result["ratio_to_floor"] = default["median_s"] / result["floor"]["median_s"]
    # the budget streaming must stay within: the floor's own extra memory, plus two of the
    # largest tensor (one merged, one on its way into the engine)
    result["memory_budget_bytes"] = result["floor"]["peak_extra_bytes"] + 2 * result["largest_tensor_bytes"]
    return result


def _roofline(sync: WeightSync, kernel: Kernel, repeats: int = 3) -> dict:
    """The merge kernel alone over the changed LoRA tensors, each merged into one scratch
    buffer (best of `repeats`), against copying W alone into it: FLOPs, seconds, GFLOP/s."""
    merged = [m for m in (sync.merger(e) for e in sync.plan.changed) if isinstance(m, MergedWeight)]
    merged = [MergedWeight(m.weight, m.left, m.right, m.scale, kernel) for m in merged]
    scratch = torch.empty(max(m.numel() for m in merged), dtype=merged[0].dtype)
    flops = sum(2 * m.shape[0] * m.shape[1] * (m.left.shape[1] + 1) for m in merged)  # product + add

    def best(write: Callable[[torch.Tensor, MergedWeight], object]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for m in merged:
                write(scratch[: m.numel()].view(m.shape), m)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        merge_s = best(lambda dest, m: dest.copy_(m))
        copy_s = best(lambda dest, m: dest.copy_(m.weight))
    return {"tensors": len(merged), "gflop": flops / 1e9, "merge_s": merge_s, "copy_s": copy_s,
            "gflops": flops / merge_s / 1e9}


def _checked(sync: WeightSync, engine: ColocatedEngine, model_dir: Path) -> dict:
    """One more sync, reported with its sizes, then what the engine serves checked against
    that strategy's trainer, and how far that trainer's base weights moved from the checkpoint."""
    report = sync()
    return {
        "bytes_sent": report.bytes_sent,
        "tensors_sent": report.tensors_sent,
        "max_abs_logprob_diff": verify(sync.model, engine, probe_sequences(engine.vocab_size, n=2)).max_abs_diff,
        "base_max_abs_change": base_weight_change(sync.model, model_dir),
        "syncs": sync.syncs,
    }


def _decode(engine: ColocatedEngine) -> dict:
    """Greedy decoding of the same prompts with the adapter and without (the engine's weights
    alone: what a merged sync decodes with), best of two batches each."""
    prompts = probe_sequences(engine.vocab_size, n=DECODE_PROMPTS, length=DECODE_PROMPT_TOKENS)
    seconds = {
        use_adapter: min(
            engine.decode_seconds_per_token(prompts, DECODE_TOKENS, use_adapter)
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
        f"largest single tensor sent: {result['largest_tensor_bytes'] / 1e6:.1f} MB; streaming's peak "
        f"extra memory {s['streaming']['peak_extra_bytes'] / 1e6:.1f} MB against a budget of "
        f"{result['memory_budget_bytes'] / 1e6:.1f} MB (floor's + 2 x largest tensor)",
        "base weights changed after "
        + ", ".join(f"{n} ({v['syncs']} syncs): {v['base_max_abs_change']:.3g}" for n, v in s.items()),
        "max |logprob diff| after syncing: "
        + ", ".join(f"{n}: {v['max_abs_logprob_diff']:.3g}" for n, v in s.items()),
    ]
    m, kernel, roof = result["machine"], result["merge_kernel"], result["roofline"]
    lines += [
        f"machine: {m['cpu_model']}, torch ISA {m['cpu_capability']} "
        f"({' '.join(m['isa_flags']) or 'no AVX2'}{', capped ' + str(m['isa_caps']) if m['isa_caps'] else ''}), "
        f"{m['torch_threads']} threads",
        f"merge kernel: {kernel['kernel']} (measured: "
        + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in kernel["measured_s"].items())
        + " on the probe weight)",
    ] + [
        f"roofline, {name}: {r['gflop']:.1f} GFLOP over {r['tensors']} tensors in {r['merge_s']:.3f} s "
        f"= {r['gflops']:.1f} GFLOP/s (float32 GEMM here: {roof['float32_gemm_gflops']:.0f} GFLOP/s; "
        f"copying the same weights alone: {r['copy_s']:.3f} s)"
        for name, r in roof.items() if isinstance(r, dict)
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
