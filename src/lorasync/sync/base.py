"""The sync's typed interface: what the trainer side needs from an engine, and what it hands it.

Every Protocol and value type of the sync lives here, so that the trainer side, the colocated
engine, the server client and the receiver inside vLLM share one definition and import
nothing of each other. An engine implements:

- `WeightReceiver`: its dtype, the checkpoint layout its model was built from and how vLLM
  groups it into fused parameters, the weight version it serves, and `load_weights`;
- `AdapterReceiver`: also serves a PEFT LoRA adapter through vLLM's LoRA support (`adapter`);
- `RecordReceiver`: also takes LoRA factors and merges them on its side (`factors`);
- `Generator`: samples completions (the trainer's rollouts);
- `Scorer`: logprobs of given tokens (verification and the trainer's health check);
- `WeightReader`: reads back what it holds, under checkpoint names (the weight-level verdict);
- `Engine`: a `Generator` and a `WeightReceiver`, what the trainer drives.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

import torch


class Strategy(str, Enum):
    """How a sync moves the trainer's policy into an engine (docs/strategies.md)."""

    STREAMING = "streaming"  # merged tensors, computed into vLLM's parameters; changed-only
    MERGE_UNMERGE = "merge-unmerge"  # the known recipe (TRL's): merge in place, send all, unmerge
    ADAPTER = "adapter"  # LoRA factors served by vLLM's own LoRA support (colocated engine)
    FACTORS = "factors"  # LoRA factors merged by the engine (a `lorasync serve` server)
    AUTO = "auto"  # streaming or adapter, whichever measures cheaper on this engine

    @classmethod
    def parse(cls, value: str | Strategy, where: str = "strategy") -> Strategy:
        """The strategy called `value`; ValueError naming `where` and the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise ValueError(f"{where} must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True)
class Completion:
    """One sampled completion: token ids, decoded text, each token's sampling logprob, and
    whether the token limit cut it off."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    truncated: bool = False  # stopped by the token limit, not by an end of sequence or turn
    # the engine's weight version each token was sampled under: reported by servers syncing
    # with in_flight="keep" (server/client/tokens.py), else filled in by the trainer's rollout, which
    # holds the engine's lock while it generates (train/rollout.py)
    versions: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Record:
    """One checkpoint tensor in a factor sync: LoRA factors (`b`, `a`, `scale`) or the value."""

    name: str
    tensors: tuple[torch.Tensor, ...]  # (b, a) with delta = scale * b @ a, or (tensor,)
    scale: float | None = None  # None: a full tensor

    @property
    def kind(self) -> str:
        return "full" if self.scale is None else "lora"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class WeightStream:
    """What a merged sync hands `load_weights`: (name, tensor) pairs computed as they are read,
    their names known before. Iterating yields them once, in `names` order (ValueError if
    `pairs` strays from it). An engine that must declare a transfer before sending it (a
    server's manifest) reads `names` and the tensors' shapes from its checkpoint layout, and
    so never holds more than one tensor; any other engine just iterates."""

    def __init__(self, names: Sequence[str], pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.names, self._pairs = list(names), pairs

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        count = 0
        for name, tensor in self._pairs:
            if count >= len(self.names) or name != self.names[count]:
                want = self.names[count] if count < len(self.names) else "nothing more"
                raise ValueError(f"weight stream: tensor {count} is {name!r}, but it named {want!r}")
            count += 1
            yield name, tensor
        if count != len(self.names):
            raise ValueError(f"weight stream: named {len(self.names)} tensors, gave {count}")

    def map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> WeightStream:
        """The same names, each tensor passed through `change` as it is read."""
        return WeightStream(self.names, ((name, change(t)) for name, t in self))


@dataclass(frozen=True)
class SyncReport:
    """What one sync did."""

    strategy: str
    tensors_sent: int
    bytes_sent: int
    seconds: float
    version: int
    # How the merge into the served weights ran: the kernel (`merge_kernel.Kernel`) where
    # lorasync merged (the trainer for streaming, the servers for factors); None where it
    # did not (adapter; merge-unmerge is PEFT's own merge).
    merge_kernel: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class WeightReceiver(Protocol):
    """What every sync needs from an engine.

    `load_weights` must be done with the tensors it is given when it returns: they may share
    memory with the trainer's live parameters, and a `MergedWeight` is computed when read, so
    one kept for later could show the policy of a later step. Copy what you keep.
    """

    dtype: torch.dtype
    vocab_size: int
    weight_version: int  # 0: the checkpoint's weights, as built; +1 per load

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]: ...

    def weight_groups(self) -> Sequence[Sequence[str]]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int: ...


@runtime_checkable
class Generator(Protocol):
    """An engine the trainer samples from: `n` completions per prompt of token ids.

    With a `seed`, prompt `i` is sampled with `prompt_seed(seed, i, n)`, so no two samples of
    one call share a random stream. An engine that knows how many tokens a sequence may hold
    (prompt and completion) says so as `max_model_len`; the trainer checks its prompts against
    it (`train/rollout.check_room`)."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
    ) -> list[list[Completion]]: ...


def prompt_seed(seed: int | None, index: int, n: int) -> int | None:
    """The seed of prompt `index` in a `Generator.generate` call seeded `seed` (None: unseeded).

    vLLM samples a request's k-th completion with seed + k; one seed for every prompt of a
    batch would give each prompt's k-th completion the same random draws, so prompts alike
    (a shared system prompt, a demonstration) take the same branch together: a temperature-1
    eval of SmolLM2 on `calc` called the tool in 27% or 100% of 52 episodes, by the seed.
    Prompt `index` gets seed + index * n: every sample of the call has a stream of its own.
    Every engine does so (the server engine sends each prompt its own seed). Pinned by
    tests/engines/test_colocated.py::test_prompts_of_one_call_draw_apart and
    tests/server/client/test_engine.py::test_prompts_of_one_seeded_call_draw_apart_on_any_server.
    """
    return None if seed is None else seed + index * n


@runtime_checkable
class Scorer(Protocol):
    """Logprob of each token given its prefix (tokens 1..n-1), for each sequence."""

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]: ...


@runtime_checkable
class WeightReader(Protocol):
    """An engine that can show what it holds: `read_back(visit, only)` calls `visit(name,
    tensor)` for each tensor it can read (with `only`, at least those of these names), under
    its checkpoint name (a tied LM head under `checkpoint.TIED_HEAD` + the embedding's), as its
    kernels compute with it. The tensor may be a view of the live weight: compare it, never
    keep it."""

    weight_version: int
    dtype: torch.dtype

    def read_back(self, visit: Callable[[str, torch.Tensor], None], only: Collection[str] | None = None) -> None: ...


class Engine(Generator, WeightReceiver, Protocol):
    """What the trainer needs: an engine it samples from and syncs into. `shared`: one engine
    for all ranks of a data-parallel run (servers), which rank 0 syncs and the others
    `follow` (`SharedEngine`); False: every rank syncs its own (colocated)."""

    shared: bool


class SharedEngine(Engine, Protocol):
    """An engine all ranks share: ranks > 0 take the version rank 0's sync reports."""

    def follow(self, version: int) -> None: ...


@runtime_checkable
class AdapterReceiver(WeightReceiver, Protocol):
    """What the `adapter` and `auto` strategies need in addition: serving a PEFT adapter.

    `decode_seconds_per_token(prompts, max_tokens, use_adapter)` times greedy decoding with
    and without the adapter, which is what `auto` decides by.
    """

    max_lora_rank: int

    def load_adapter(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping, name: str = "policy"
    ) -> int: ...

    def decode_seconds_per_token(
        self, prompts: Sequence[Sequence[int]], max_tokens: int, use_adapter: bool
    ) -> float: ...


@runtime_checkable
class RecordReceiver(WeightReceiver, Protocol):
    """What the `factors` strategy needs in addition: records merged on the engine's side,
    with the kernel(s) named by `merge_kernel` (`SyncReport.merged_by`)."""

    merge_kernel: str

    def load_records(self, records: Sequence[Record]) -> int: ...
