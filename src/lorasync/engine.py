"""The generator: an in-process (colocated) vLLM engine that takes token ids and new weights.

The engine knows nothing of training. It generates from token ids, scores token sequences
(prompt logprobs), and accepts checkpoint-format weights, which it loads in place through the
worker extension in `engine_worker.py`. Every weight load resets the prefix cache (cached
keys/values of the old weights would otherwise be served) and bumps `weight_version`.
With `enable_lora` it also serves a LoRA adapter through vLLM's own LoRA support instead
(`load_adapter`, each version under a new name).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WORKER_EXTENSION = "lorasync.engine_worker.LoraSyncWorkerExtension"
# Checkpoint module names of embeddings and output heads: never LoRA targets in vLLM here.
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "wpe"})


@dataclass
class EngineConfig:
    """How to build the colocated vLLM engine.

    `enforce_eager` defaults to True because on CPU vLLM's torch.compile warm-up costs about
    35 s per new model shape, far more than a tiny model ever saves from it.
    """

    model: str
    dtype: str = "float32"
    max_model_len: int = 512
    seed: int = 0
    enforce_eager: bool = True
    kv_cache_gib: int = 1
    enable_prefix_caching: bool = True
    # vLLM's own LoRA support, needed by the `adapter` sync strategy (and `auto`, which
    # measures it); adapters of rank above max_lora_rank are refused.
    enable_lora: bool = False
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(
                f"EngineConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )
        if not (Path(self.model) / "config.json").is_file():
            raise FileNotFoundError(
                f"EngineConfig.model: no config.json in {self.model!r}; pass a directory "
                "holding a Hugging Face model (e.g. one made by `lorasync make-tiny`)"
            )
        if self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class Completion:
    """One sampled completion: token ids, decoded text and each token's sampling logprob."""

    token_ids: list[int]
    text: str
    logprobs: list[float]


def checkpoint_layout(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a model directory's safetensors files (headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    layout: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                layout[name] = tuple(f.get_slice(name).get_shape())
    return layout


def weight_groups(
    layout: Mapping[str, tuple[int, ...]], packed_modules: Mapping[str, Sequence[str]]
) -> list[list[str]]:
    """Group checkpoint names by the vLLM module they load into, in layout order.

    A module's weight and bias form one group (vLLM's layerwise reload processes a layer once
    all its elements arrived); modules vLLM fuses (`packed_modules_mapping`, e.g. q/k/v into
    qkv_proj) form one group together.
    """
    fused_into = {part: fused for fused, parts in packed_modules.items() for part in parts}
    groups: dict[str, list[str]] = {}
    for name in layout:
        module, _, _ = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        key = f"{parent}.{fused_into[leaf]}" if leaf in fused_into else module
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def prompt_logprobs(
    llm: LLM, sequences: Sequence[Sequence[int]], lora_request: LoRARequest | None = None
) -> list[list[float]]:
    """Logprob of each token given its prefix (tokens 1..n-1) for each sequence, from a vLLM `LLM`.

    A function rather than only a method so that an `LLM` built elsewhere (TRL's) scores the
    same way as `ColocatedEngine`.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
        params,
        use_tqdm=False,
        lora_request=lora_request,
    )
    return [
        [lp[t].logprob for t, lp in zip(seq[1:], out.prompt_logprobs[1:])]
        for seq, out in zip(sequences, outputs)
    ]


class ColocatedEngine:
    """vLLM's `LLM` in this process, with the lorasync worker extension loaded."""

    _live = 0  # engines built and not yet closed in this process (see `close`)

    def __init__(self, config: EngineConfig) -> None:
        # The engine core must live in this process: weights are streamed to the worker as a
        # Python iterator, which only an in-process executor can take without serializing.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
        from vllm import LLM
        from vllm.model_executor.layers import rotary_embedding

        # vLLM caches rotary-embedding modules process-wide (private `_ROPE_DICT`), so two
        # engines in one process would share them, and an in-place reload of one engine leaves
        # the other's cos/sin cache on the meta device. Each engine gets its own.
        # Pinned by tests/test_sync_guards.py (a second engine's scoring crashes without it).
        rotary_embedding._ROPE_DICT.clear()

        self.config = config
        self.dtype = DTYPES[config.dtype]
        self.weight_version = 0
        # The adapter being served (strategy `adapter`), and where its files live: tmpfs when
        # the machine has one, so installing an adapter never touches a disk.
        self.adapter: LoRARequest | None = None
        self._adapter_root: Path | None = None
        self._layout = checkpoint_layout(config.model)
        hf_config = json.loads((Path(config.model) / "config.json").read_text())
        self.vocab_size: int = hf_config["vocab_size"]
        self.llm = LLM(
            model=config.model,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            worker_extension_cls=WORKER_EXTENSION,
            **(self._lora_args() if config.enable_lora else {}),
        )
        ColocatedEngine._live += 1
        self.tokenizer = self.llm.get_tokenizer()
        packed = self.llm.collective_rpc("lorasync_packed_modules")[0]
        self._groups = weight_groups(self._layout, packed)

    def _lora_args(self) -> dict:
        """vLLM's LoRA settings: adapters on the linear layers of the blocks only.

        Left to itself, vLLM 0.32 also wraps an untied lm_head for LoRA, and then every
        prompt-logprob request with an adapter crashes on CPU (punica `bgmv_shrink`:
        "einsum(): subscript b has size 4 ... does not broadcast with ... 31": the logits of
        all prompt tokens meet per-sequence LoRA indices). Naming the block linears as
        `lora_target_modules` keeps the lm_head and embeddings out (adapters that train them
        are refused on the trainer side). Pinned by tests/test_adapter_sync.py (sync-check of
        an untied llama with the adapter strategy).
        """
        linears = {
            name.rsplit(".", 2)[-2]
            for name, shape in self._layout.items()
            if name.endswith(".weight") and len(shape) == 2
        } - EMBEDDING_MODULES
        return {
            "enable_lora": True,
            "max_lora_rank": self.config.max_lora_rank,
            "lora_target_modules": sorted(linears),
        }

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]:
        """The checkpoint names and shapes this engine's model was built from."""
        return self._layout

    def weight_groups(self) -> list[list[str]]:
        """Checkpoint names that load into one vLLM parameter set and must be sent together."""
        return self._groups

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load checkpoint-format tensors in place; return the new weight version.

        The caller must send whole fused groups (q/k/v, gate/up): vLLM's layerwise reload
        gives undefined results for a partial group.
        """
        self.llm.collective_rpc("lorasync_reload", args=(weights,))
        # Loaded weights are the whole policy now: an adapter on top would apply twice.
        self._remove_adapter()
        self.llm.reset_prefix_cache()
        self.weight_version += 1
        return self.weight_version

    def load_adapter(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping, name: str = "policy"
    ) -> int:
        """Serve a LoRA adapter on the checkpoint's base weights; return the new weight version.

        `tensors` are the LoRA factors under PEFT's saved names and `config` the content of
        PEFT's adapter_config.json. Each call installs the adapter under a new name and id,
        `{name}-v{version}` and `version`: vLLM keys prefix-cache blocks by adapter name and
        path, so blocks computed with an older adapter can never be served for this one.
        The older adapter is removed from vLLM and its files deleted. The engine's weights
        must be the checkpoint's (a merged sync since would apply the policy twice).
        """
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if not self.config.enable_lora:
            raise ValueError(
                "this engine was built without LoRA support, so it cannot serve an adapter: "
                "build it with EngineConfig(enable_lora=True)"
            )
        rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
        if rank > self.config.max_lora_rank:
            raise ValueError(
                f"adapter rank {rank} exceeds the engine's max_lora_rank "
                f"{self.config.max_lora_rank}: build the engine with "
                f"EngineConfig(max_lora_rank={rank}) or more"
            )
        if self._adapter_root is None:
            shm = Path("/dev/shm")
            self._adapter_root = Path(
                tempfile.mkdtemp(prefix="lorasync-adapters-", dir=shm if shm.is_dir() else None)
            )
        version = self.weight_version + 1
        folder = self._adapter_root / f"{name}-v{version}"
        folder.mkdir()
        save_file(
            {k: t.detach().contiguous() for k, t in tensors.items()},
            str(folder / "adapter_model.safetensors"),
        )
        (folder / "adapter_config.json").write_text(json.dumps(dict(config)))
        request = LoRARequest(lora_name=folder.name, lora_int_id=version, lora_path=str(folder))
        try:
            # Public API: loads the adapter now, so a bad adapter fails here, not mid-rollout.
            self.llm.llm_engine.add_lora(request)
        except Exception:
            shutil.rmtree(folder)
            raise
        self._remove_adapter()
        self.adapter = request
        self.weight_version = version
        return version

    def _remove_adapter(self) -> None:
        """Stop serving the current adapter: remove it from vLLM and delete its files."""
        if self.adapter is not None:
            self.llm.llm_engine.remove_lora(self.adapter.lora_int_id)
            shutil.rmtree(self.adapter.lora_path, ignore_errors=True)
            self.adapter = None

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
        use_adapter: bool = True,
    ) -> list[list[Completion]]:
        """Sample `n` completions per prompt; returns one list of completions per prompt.

        The current adapter, if any, is applied unless `use_adapter` is False (which serves the
        engine's weights alone: how `bench` and `auto` time decoding without the adapter).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=n, max_tokens=max_tokens, temperature=temperature, seed=seed, logprobs=0
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            params,
            use_tqdm=False,
            lora_request=self.adapter if use_adapter else None,
        )
        return [
            [
                Completion(
                    token_ids=list(c.token_ids),
                    text=c.text,
                    logprobs=[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                )
                for c in out.outputs
            ]
            for out in outputs
        ]

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix (tokens 1..n-1) for each sequence."""
        return prompt_logprobs(self.llm, sequences, self.adapter)

    def close(self) -> None:
        """Shut the engine down and free its memory.

        vLLM's in-process EngineCore.shutdown also tears down vLLM's process-wide distributed
        state (`cleanup_dist_env_and_memory`), which every other engine in this process still
        uses: their next step fails with "pipeline model parallel group is not initialized".
        So that teardown (a private vLLM name) is skipped while other engines are alive.
        Pinned by tests/test_trainer.py (the demo closes its engine beside a live one).
        """
        from vllm.v1.engine import core

        ColocatedEngine._live -= 1
        teardown = core.cleanup_dist_env_and_memory
        if ColocatedEngine._live > 0:
            core.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            core.cleanup_dist_env_and_memory = teardown
        del self.llm
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)
