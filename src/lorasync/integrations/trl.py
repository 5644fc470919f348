"""lorasync's sync inside TRL's GRPOTrainer and RLOOTrainer (TRL 1.16.x, vLLM colocate mode).

TRL 1.16 syncs a PEFT policy into its colocated vLLM engine in
`trl/generation/vllm_generation.py::VLLMGeneration.sync_weights`: merge the adapter in place,
push every parameter with one `model.load_weights` call each on the live vLLM model, unmerge.
On vLLM's CPU backend that crashes at the first sync (`AttributeError: 'Parameter' object has
no attribute 'weight_loader'`: the live model's linear layers were re-laid out after loading);
elsewhere it drifts the trainer's frozen base weights in bf16 and sends every tensor, every step.

`use_lorasync_sync(trainer)` replaces that one method on that one trainer's `VLLMGeneration`
(an instance attribute; the class and other trainers are untouched) with
`lorasync.sync.weight_sync.WeightSync`: streaming merged tensors, changed-only after the first
sync, the trainer model
never mutated, loaded by vLLM's layerwise in-place reload, then the prefix cache reset. Why
this and not a subclass: GRPOTrainer and RLOOTrainer both build a `VLLMGeneration` deep inside
their `__init__` and call only its `sync_weights()`, so patching that method after
construction covers both trainers with one call, keeps the user's trainer class, and needs no
change to how TRL builds its engine.

TRL builds its `LLM` itself; `ColocatedEngine.from_llm` wraps it exactly as lorasync's own
engine wraps the `LLM` it builds: the worker-side functions of `lorasync.engines.worker` run
through `LLM.collective_rpc`. TRL's colocate mode uses vLLM's `external_launcher` executor,
which keeps the engine in this process, so the functions and the weight generator are called
directly, never pickled.

`vllm_engine_args(...)` covers what TRL 1.16 cannot set on its `LLM`: vLLM's dtype (vLLM
downcasts a float32 checkpoint to bf16 on CPU, too coarse for a 1e-4 parity check) and
`enforce_eager` (torch.compile warm-up costs about 30 s per model on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version
from peft import PeftModel

from lorasync.engines.colocated import ColocatedEngine
from lorasync.sync.weight_sync import WeightSync

if TYPE_CHECKING:
    from transformers import Trainer
    from vllm import LLM

SUPPORTED_TRL = "1.16.x"


def check_trl_version() -> None:
    """Raise RuntimeError unless the installed TRL is a 1.16 release.

    The integration patches `VLLMGeneration.sync_weights` and reads `VLLMGeneration.llm`,
    which are TRL internals that moved before (PR #4700) and may move again.
    """
    installed = Version(version("trl"))
    if installed.release[:2] != (1, 16):
        raise RuntimeError(
            f"lorasync.integrations.trl supports TRL {SUPPORTED_TRL}, but TRL {installed} is "
            "installed: pip install 'trl==1.16.*' (or lorasync[trl])"
        )


def _model_folder(model: str, revision: str | None) -> Path:
    """The local folder of the checkpoint vLLM loaded: the path itself, or the hub cache's copy."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    # vLLM downloaded it already; only the safetensors headers are read, from the cache.
    return Path(
        snapshot_download(
            model, revision=revision, allow_patterns=["*.safetensors"], local_files_only=True
        )
    )


def served_folder(llm: LLM) -> Path:
    """The local folder of the checkpoint an `LLM` serves (what `ColocatedEngine.from_llm` reads)."""
    config = llm.llm_engine.model_config
    return _model_folder(config.model, config.revision)


def use_lorasync_sync(trainer: Trainer) -> WeightSync:
    """Make a TRL GRPOTrainer or RLOOTrainer sync its LoRA policy into vLLM with lorasync.

    Call it after building the trainer and before `trainer.train()`. Returns the `WeightSync`
    now called at every TRL weight sync; `verify(sync.model, sync.engine, probes)` checks
    parity at any point. Raises RuntimeError for an unsupported TRL version, ValueError for a
    trainer setup the colocated sync does not cover, TypeError for a policy that is not a
    PEFT LoRA model.
    """
    check_trl_version()
    args = trainer.args
    if not args.use_vllm:
        raise ValueError(
            "use_lorasync_sync needs a trainer that generates with vLLM, but args.use_vllm is "
            "False: set use_vllm=True, vllm_mode='colocate'"
        )
    if args.vllm_mode != "colocate":
        raise ValueError(
            f"use_lorasync_sync supports vllm_mode='colocate' only (the engine in the trainer's "
            f"process), got vllm_mode={args.vllm_mode!r}: set vllm_mode='colocate'"
        )
    if args.vllm_enable_sleep_mode:
        # Sleep level 2 discards vLLM's weights after each generation; a changed-only sync
        # would then leave every unchanged tensor empty.
        raise ValueError(
            "use_lorasync_sync does not support vllm_enable_sleep_mode=True (vLLM discards "
            "its weights while asleep): set vllm_enable_sleep_mode=False"
        )
    if args.vllm_tensor_parallel_size != 1:
        raise ValueError(
            "use_lorasync_sync is verified with one vLLM worker per trainer process only, got "
            f"vllm_tensor_parallel_size={args.vllm_tensor_parallel_size}: set it to 1"
        )
    deepspeed = args.deepspeed_plugin
    if trainer.is_fsdp_enabled or (deepspeed is not None and deepspeed.zero_stage == 3):
        raise ValueError(
            "use_lorasync_sync needs every trainer process to hold whole parameters, but FSDP "
            "or DeepSpeed ZeRO-3 shards them: use DDP or ZeRO-1/2"
        )
    # `trainer.vllm_generation` (a VLLMGeneration) and its `model`, `llm` and `sync_weights`
    # are TRL 1.16 internals, shared by GRPOTrainer and RLOOTrainer; hence the version check.
    generation = trainer.vllm_generation
    if not isinstance(generation.model, PeftModel):
        raise TypeError(
            "use_lorasync_sync syncs PEFT LoRA policies, but the trainer's model is a "
            f"{type(generation.model).__name__}: pass peft_config=LoraConfig(...) to the trainer"
        )
    engine = ColocatedEngine.from_llm(generation.llm, served_folder(generation.llm))
    sync = WeightSync(generation.model, engine)
    # TRL calls `self.vllm_generation.sync_weights()` once per optimizer step before
    # generating; the instance attribute shadows the method for this trainer only.
    generation.sync_weights = sync
    return sync


@contextmanager
def vllm_engine_args(**kwargs: Any) -> Iterator[None]:
    """Extra keyword arguments for the vLLM `LLM` a TRL trainer builds inside this block.

    TRL 1.16 builds its `LLM` in `VLLMGeneration._init_vllm` from a fixed set of arguments;
    this passes more (e.g. `dtype="float32"`, `enforce_eager=True`) to the trainers built
    inside the `with` block. An argument TRL sets itself raises ValueError when the engine is
    built, instead of being silently overridden.

        with vllm_engine_args(dtype="float32", enforce_eager=True):
            trainer = GRPOTrainer(..., args=GRPOConfig(use_vllm=True, vllm_mode="colocate"))
    """
    check_trl_version()
    from trl.generation import vllm_generation

    llm_class = vllm_generation.LLM

    @functools.wraps(llm_class)
    def build(*args: Any, **trl_kwargs: Any) -> LLM:
        clash = sorted(set(kwargs) & set(trl_kwargs))
        if clash:
            raise ValueError(
                f"vllm_engine_args got {', '.join(clash)}, which TRL sets itself on its LLM: "
                "set it through the trainer's config (GRPOConfig.vllm_*) instead"
            )
        return llm_class(*args, **trl_kwargs, **kwargs)

    # `_init_vllm` looks `LLM` up in its module's globals when it runs, so this name is the
    # one place TRL's engine construction can be extended (private to TRL 1.16).
    vllm_generation.LLM = build
    try:
        yield
    finally:
        vllm_generation.LLM = llm_class
