"""`lorasync bench sync --server`: the server path beside the colocated strategies.

Starts one `lorasync serve` server on the benchmark's model (the real 0.5B shape by default),
syncs the same kind of adapter into it by LoRA factors, and reports bytes on the wire per sync
against the merged changed-only bytes the colocated streaming sync sends, the sync seconds
(pause, transfer, server-side merge and reload, resume, over HTTP and TCP on loopback), the
server's pristine copy, and logprob parity.
"""

from __future__ import annotations

import secrets
import statistics
import time

import torch

from lorasync.bench.sync import BenchConfig, bench_model_dir, bench_policy
from lorasync.server.client.engine import ServerEngine
from lorasync.server.serve.launch import free_port, start_server, wait_healthy
from lorasync.sync.base import Strategy
from lorasync.sync.verify import probe_sequences, verify
from lorasync.sync.weight_sync import WeightSync


def run_server_bench(config: BenchConfig) -> dict:
    """Measure the factor sync into a fresh local server; return the JSON-ready result."""
    model_dir = bench_model_dir(config)
    trainer = bench_policy(model_dir, config)
    token, port = secrets.token_hex(16), free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = start_server(
        str(model_dir), token, port,
        ["--dtype", config.dtype, "--max-model-len", "256", "--enforce-eager",
         "--disable-uvicorn-access-log"],
        env_extra={"VLLM_LOGGING_LEVEL": "WARNING"},
    )
    try:
        wait_healthy(url, server, timeout=600)
        result: dict = {"server_startup_s": time.perf_counter() - started}
        # the default (compressed) and raw factors, each through its own client, in turns
        syncs = {
            key: WeightSync(trainer, ServerEngine(url, token, timeout=300, compress=compress), Strategy.FACTORS)
            for key, compress in (("compressed", True), ("raw", False))
        }
        for sync in syncs.values():
            sync()  # the first sync also reads the server's pristine copy from disk
        seconds: dict[str, list[float]] = {key: [] for key in syncs}
        for _ in range(config.repeats):
            for key, sync in syncs.items():
                seconds[key].append(sync().seconds)
        raw = syncs["raw"]  # both clients sync one plan into one server
        elem = torch.empty((), dtype=raw.engine.dtype).element_size()
        layout = raw.engine.checkpoint_layout()
        merged = sum(torch.Size(layout[e.checkpoint]).numel() * elem for e in raw.plan.changed)
        for key, sync in syncs.items():
            engine = sync.engine
            sync()  # the server now serves this client's sync: check it
            result[key] = {
                "median_s": statistics.median(seconds[key]),
                "min_s": min(seconds[key]),
                "wire_bytes": engine.last_wire_bytes,
                "wire_over_merged": engine.last_wire_bytes / merged,
                "max_abs_logprob_diff": verify(trainer, engine, probe_sequences(engine.vocab_size, n=2)).max_abs_diff,
            }
            engine.close()
        # the server keeps the checkpoint values of every group a sync touches
        result |= {"merged_changed_bytes": merged, "pristine_bytes": merged}
        result["merge_kernel"] = raw.engine.merge_kernel  # measured by the server on its machine
    finally:
        server.terminate()
        server.wait(timeout=120)
    return result


def format_server(result: dict) -> str:
    lines = [
        f"server (lorasync serve, LoRA factors; merged changed-only would be "
        f"{result['merged_changed_bytes'] / 1e6:.1f} MB, the server's pristine copy "
        f"{result['pristine_bytes'] / 1e6:.1f} MB; server start {result['server_startup_s']:.0f} s; "
        f"merge kernel {result['merge_kernel']}):"
    ]
    for key, label in (("compressed", "compressed (default)"), ("raw", "raw factors")):
        r = result[key]
        lines.append(
            f"  {label}: median {r['median_s']:.3f} s per sync, {r['wire_bytes'] / 1e6:.2f} MB on "
            f"the wire = {100 * r['wire_over_merged']:.2f}% of merged, max |logprob diff| "
            f"{r['max_abs_logprob_diff']:.3g}"
        )
    return "\n".join(lines)
