"""`sync-check`: load a base model into vLLM and an adapter into the trainer, sync, verify.

This is the end-to-end proof of one sync path, usable from the CLI and from tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lorasync.adapters import load_policy
from lorasync.engine import ColocatedEngine, EngineConfig
from lorasync.adapter_sync import ADAPTER, check_servable
from lorasync.sync import STRATEGIES, WeightSync
from lorasync.verify import TOLERANCES, base_weight_change, probe_sequences, verify


@dataclass
class SyncCheckConfig:
    base: str
    adapter: str
    dtype: str = "float32"
    repeat: int = 1
    tolerance: float | None = None
    strategy: str = "streaming"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {self.repeat}")
        if self.tolerance is None:
            self.tolerance = TOLERANCES[self.dtype]
        if self.strategy not in (*STRATEGIES, ADAPTER):
            raise ValueError(
                f"--strategy must be one of {', '.join((*STRATEGIES, ADAPTER))}, "
                f"got {self.strategy!r}"
            )
        if self.tolerance <= 0:
            raise ValueError(f"--tolerance must be > 0, got {self.tolerance}")


def run_sync_check(config: SyncCheckConfig, progress: bool = False) -> dict:
    """Run the check and return its result; `result["ok"]` says whether parity held."""
    model = load_policy(config.base, config.adapter, config.dtype)
    if config.strategy == ADAPTER:
        check_servable(model)  # before the engine is built (about 20 s)
    engine = ColocatedEngine(
        EngineConfig(
            model=config.base,
            dtype=config.dtype,
            enable_lora=config.strategy == ADAPTER,
            # the adapter's own rank (or pattern maximum), so any servable rank loads
            max_lora_rank=max([16, model.active_peft_config.r,
                               *(model.active_peft_config.rank_pattern or {}).values()]),
        )
    )
    try:
        sync = WeightSync(model, engine, config.strategy)
        reports = [sync() for _ in tqdm(range(config.repeat), desc="sync", disable=not progress)]
        verification = verify(model, engine, probe_sequences(engine.vocab_size))
    finally:
        engine.close()
    last = reports[-1]
    return {
        "ok": verification.max_abs_diff <= config.tolerance,
        "max_abs_logprob_diff": verification.max_abs_diff,
        "mean_abs_logprob_diff": verification.mean_abs_diff,
        "tolerance": config.tolerance,
        "dtype": config.dtype,
        "strategy": config.strategy,
        "tensors_sent": last.tensors_sent,
        "bytes_sent": last.bytes_sent,
        "sync_seconds": last.seconds,
        "sync_seconds_all": [r.seconds for r in reports],
        "weight_version": last.version,
        "base_max_abs_change": base_weight_change(model, Path(config.base)),
    }
