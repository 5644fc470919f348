"""The colocated engine: vLLM's `LLM` in the trainer's process, taking token ids and new weights.

The engine knows nothing of training. It generates from token ids, scores token sequences
(prompt logprobs), and accepts checkpoint-format weights, which it loads in place through
`worker.py`. Every weight load resets the prefix cache (cached keys/values of the old weights
would otherwise be served) and bumps `weight_version`. With `enable_lora` it also serves a
LoRA adapter through vLLM's own LoRA support instead (`load_adapter`, each version under a
new name). `ColocatedEngine.from_llm` wraps an `LLM` built elsewhere (TRL's).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorasync.served_model import check_dtype, checkpoint_layout, kv_bytes_per_token, weight_groups
from lorasync.engines import require_vllm, vllm_compat, worker
from lorasync.sync.base import Completion, prompt_seed
from lorasync.sync.naming import check_adapter_name
from lorasync.sync.policy import MAX_LORA_RANK

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.lora.request import LoRARequest


# Tokens per sequence (prompt + completion) an engine holds unless told otherwise: RL rollouts
# here are short, and the KV cache on CPU is small.
DEFAULT_MAX_MODEL_LEN = 512
# The KV cache's largest default size, and the block vLLM's CPU backend allocates it by (tokens).
MAX_KV_CACHE_BYTES = 1 << 30
KV_BLOCK_TOKENS = 128


def model_context(model_dir: str) -> int | None:
    """The model's own context length (`max_position_embeddings` of its text config), if known."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    return config.get("max_position_embeddings") or config.get("n_positions")


@dataclass
class EngineConfig:
    """How to build the colocated vLLM engine.

    `enforce_eager` defaults to True because on CPU vLLM's torch.compile warm-up costs about
    35 s per new model shape, far more than a tiny model ever saves from it. `max_model_len`
    (prompt plus completion tokens) defaults to `DEFAULT_MAX_MODEL_LEN`, capped by the model's
    own context (`max_position_embeddings`); more than the model's context is refused.
    `kv_cache_bytes` defaults to what `batch_sequences` sequences of `max_model_len` tokens
    need (`served_model.kv_bytes_per_token`), at least one sequence's and at most
    `MAX_KV_CACHE_BYTES`; without `batch_sequences`, that most. $VLLM_CPU_KVCACHE_SPACE (GiB),
    where set, wins (vLLM reads it).
    """

    model: str
    dtype: str = "float32"
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = True
    kv_cache_bytes: int | None = None
    batch_sequences: int | None = None  # the sequences a step generates at once (the KV cache's size)
    enable_prefix_caching: bool = True
    # vLLM's own LoRA support, needed by the `adapter` sync strategy (and `auto`, which
    # measures it); adapters of rank above max_lora_rank are refused.
    enable_lora: bool = False
    max_lora_rank: int = MAX_LORA_RANK

    def __post_init__(self) -> None:
        check_dtype(self.dtype, "EngineConfig.dtype")
        if not (Path(self.model) / "config.json").is_file():
            raise FileNotFoundError(
                f"EngineConfig.model: no config.json in {self.model!r}; pass a directory "
                "holding a Hugging Face model (e.g. one made by `lorasync make-tiny`)"
            )
        context = model_context(self.model)
        if self.max_model_len is None:
            self.max_model_len = min(DEFAULT_MAX_MODEL_LEN, context or DEFAULT_MAX_MODEL_LEN)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if context is not None and self.max_model_len > context:
            raise ValueError(
                f"max_model_len = {self.max_model_len} exceeds the model's context "
                f"(max_position_embeddings = {context} in {self.model}): use at most {context}"
            )
        if self.max_lora_rank < 1:
            raise ValueError(f"EngineConfig.max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.batch_sequences is not None and self.batch_sequences < 1:
            raise ValueError(f"EngineConfig.batch_sequences must be >= 1, got {self.batch_sequences}")
        if self.kv_cache_bytes is None:
            blocks = -(-self.max_model_len // KV_BLOCK_TOKENS)  # a sequence's blocks, rounded up
            one = blocks * KV_BLOCK_TOKENS * kv_bytes_per_token(self.model, self.dtype)
            want = MAX_KV_CACHE_BYTES if self.batch_sequences is None else self.batch_sequences * one
            self.kv_cache_bytes = max(one, min(want, MAX_KV_CACHE_BYTES))


class ColocatedEngine:
    """vLLM's `LLM` in this process, as a sync target (`WeightReceiver`, `AdapterReceiver`),
    a `Generator`, a `Scorer` and a `WeightReader`."""

    _live = 0  # engines built (not wrapped) and not yet closed in this process (see `close`)
    shared = False  # each rank of a data-parallel run has its own (`base.Engine`)

    def __init__(self, config: EngineConfig) -> None:
        # The engine core must live in this process: weights are streamed to the worker as a
        # Python iterator, which only an in-process executor can take without serializing.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        require_vllm()
        from vllm import LLM

        vllm_compat.fresh_rope_cache()
        layout = checkpoint_layout(config.model)
        llm = LLM(
            model=config.model,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            kv_cache_memory_bytes=config.kv_cache_bytes,
            # No chunked prefill on CPU: a split prompt crashes seeded sampling there.
            **vllm_compat.scheduler_args(),
            **(vllm_compat.lora_args(layout, config.max_lora_rank) if config.enable_lora else {}),
        )
        ColocatedEngine._live += 1
        self._attach(llm, layout, owned=True)
        self.max_lora_rank = config.max_lora_rank if config.enable_lora else 0
        self.kv_cache_bytes: int | None = config.kv_cache_bytes  # what vLLM was given (None: wrapped)

    @classmethod
    def from_llm(cls, llm: LLM, model_dir: str | Path) -> ColocatedEngine:
        """Wrap an in-process `LLM` built elsewhere (TRL's) from the model in `model_dir`.

        It serves no adapters (`max_lora_rank` 0), and `close` leaves the `LLM` to its owner.
        """
        engine = cls.__new__(cls)
        engine._attach(llm, checkpoint_layout(model_dir), owned=False)
        engine.max_lora_rank = 0
        return engine

    def _attach(self, llm: LLM, layout: Mapping[str, tuple[int, ...]], owned: bool) -> None:
        self.llm = llm
        self._owned = owned
        model_config = llm.llm_engine.model_config
        self.dtype: torch.dtype = model_config.dtype
        self.vocab_size: int = model_config.get_vocab_size()
        self.max_model_len: int = model_config.max_model_len  # prompt and completion tokens
        self.weight_version = 0
        # The adapter being served (strategy `adapter`), and where its files live: tmpfs when
        # the machine has one, so installing an adapter never touches a disk.
        self.adapter: LoRARequest | None = None
        self._adapter_root: Path | None = None
        self._layout = layout
        self._groups = weight_groups(layout, llm.collective_rpc(worker.packed_modules)[0])

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]:
        """The checkpoint names and shapes this engine's model was built from."""
        return self._layout

    def weight_groups(self) -> list[list[str]]:
        """Checkpoint names that load into one vLLM parameter set and must be sent together."""
        return self._groups

    def read_back(self, visit: Callable[[str, torch.Tensor], None], only: Collection[str] | None = None) -> None:
        """Show what the engine holds, tensor by tensor, under checkpoint names (`WeightReader`)."""
        self.llm.collective_rpc(worker.read_back, args=(self._layout, visit, only))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load checkpoint-format tensors in place; return the new weight version.

        The caller must send whole fused groups (q/k/v, gate/up): vLLM's layerwise reload
        gives undefined results for a partial group.
        """
        self.llm.collective_rpc(worker.reload, args=(weights,))
        # Loaded weights are the whole policy now: an adapter on top would apply twice.
        self._remove_adapter()
        # Cached prompt blocks hold keys/values of the old weights (TRL resets it too, #3024).
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

        check_adapter_name(name)
        rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
        if rank > self.max_lora_rank:
            raise ValueError(
                f"adapter rank {rank} exceeds the engine's max_lora_rank {self.max_lora_rank} "
                f"(0: built without LoRA support): build the engine with "
                f"EngineConfig(enable_lora=True, max_lora_rank={rank})"
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
    ) -> list[list[Completion]]:
        """Sample `n` completions per prompt (with the served adapter, if any); one list of
        completions per prompt."""
        return self._generate(prompts, max_tokens, temperature, n, seed, self.adapter)

    def _generate(self, prompts, max_tokens, temperature, n, seed, lora_request) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature,
                           seed=prompt_seed(seed, i, n), logprobs=0)
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            params,
            use_tqdm=False,
            lora_request=lora_request,
        )
        return [
            [
                Completion(
                    token_ids=list(c.token_ids),
                    text=c.text,
                    logprobs=[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                    truncated=c.finish_reason == "length",
                )
                for c in out.outputs
            ]
            for out in outputs
        ]

    def decode_seconds_per_token(
        self, prompts: Sequence[Sequence[int]], max_tokens: int, use_adapter: bool
    ) -> float:
        """Seconds per generated token of one greedy batch, with the served adapter or on the
        engine's weights alone (tokens counted, as EOS may stop early): what `auto` weighs."""
        start = time.perf_counter()
        lora = self.adapter if use_adapter else None
        outputs = self._generate(prompts, max_tokens, 0.0, 1, None, lora)
        seconds = time.perf_counter() - start
        return seconds / max(1, sum(len(c.token_ids) for out in outputs for c in out))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix (tokens 1..n-1) for each sequence."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
            params,
            use_tqdm=False,
            lora_request=self.adapter,
        )
        return [
            [lp[t].logprob for t, lp in zip(seq[1:], out.prompt_logprobs[1:])]
            for seq, out in zip(sequences, outputs)
        ]

    def close(self) -> None:
        """Shut the engine down and free its memory (a wrapped `LLM` is left to its owner)."""
        if self._owned:
            ColocatedEngine._live -= 1
            vllm_compat.shutdown(self.llm, others_alive=ColocatedEngine._live > 0)
            del self.llm
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)
