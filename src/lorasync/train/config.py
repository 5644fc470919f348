"""Training run configuration: dataclasses, validated on creation, loaded from YAML plus overrides.

`lorasync train --config run.yaml rollout.num_generations=4 optim.lr=1e-3` reads the YAML file,
applies each `section.field=value` (the value parsed as YAML), and builds `TrainConfig`. Unknown
sections or fields, and values that break a rule, fail with the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorasync.environments.episodes import Limits
from lorasync.served_model import DTYPES
from lorasync.sync.base import Strategy
from lorasync.sync.kinds import ENGINE_KINDS, IN_FLIGHT, check_pair, default_strategy


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the field and the fix."""


def require(ok: bool, name: str, value: Any, rule: str) -> None:
    """ConfigError naming the setting, its value and the rule, unless `ok` (also the benches'
    flags: `--flag = value: fix`)."""
    if not ok:
        raise ConfigError(f"{name} = {value!r}: {rule}")


@dataclass
class ModelConfig:
    base: str = ""  # a Hugging Face model folder (vLLM and the trainer both load it)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        require(bool(self.base), "model.base", self.base, "set it to a model folder")
        require(self.dtype in DTYPES, "model.dtype", self.dtype, f"use one of {', '.join(DTYPES)}")


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        require(self.rank >= 1, "lora.rank", self.rank, "must be >= 1")
        require(bool(self.targets), "lora.targets", self.targets, "name modules or all-linear")
        require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class DataConfig:
    # Prompts: a JSONL file, a folder saved by `datasets` (save_to_disk), an inline list, or a
    # generated task (`task: arith`, from `lorasync.tasks`: `size` problems of `split`).
    path: str = ""
    prompts: list[str] = field(default_factory=list)
    prompt_field: str = "prompt"
    task: str = ""
    split: str = "train"
    size: int = 2000
    levels: list[str] = field(default_factory=list)  # the task's levels; empty: its default mix

    def __post_init__(self) -> None:
        require(
            sum(map(bool, (self.path, self.prompts, self.task))) == 1,
            "data.path / data.prompts / data.task",
            (self.path, len(self.prompts), self.task),
            "set exactly one: a JSONL file or dataset folder, an inline list of prompts, or a task",
        )
        if self.task:
            from lorasync.tasks.registry import TASKS

            require(self.task in TASKS, "data.task", self.task, f"must be one of {', '.join(TASKS)}")
            splits = TASKS[self.task].SPLITS
            require(self.split in splits, "data.split", self.split, f"must be one of {', '.join(splits)}")
            require(self.size >= 1, "data.size", self.size, "must be >= 1")
            if self.levels:
                TASKS[self.task].check_levels(self.levels)


@dataclass
class RewardSpec:
    function: str = ""  # "module:function", TRL's signature fn(prompts, completions, **columns)
    weight: float = 1.0

    def __post_init__(self) -> None:
        require(":" in self.function, "rewards[].function", self.function, "write it as 'package.module:function'")


ROLLOUT_MODES = ("sync", "async")


@dataclass
class RolloutConfig:
    prompts_per_step: int = 4
    num_generations: int = 8
    max_tokens: int = 16
    temperature: float = 1.0
    # sync: generate, then train, then sync, one after the other. async: a producer generates
    # the batches of coming steps while the trainer trains (docs/async.md), each used at most
    # `max_staleness` policy versions after the one that sampled it.
    mode: str = "sync"
    max_staleness: int = 0
    # async with servers, a sync while a batch is being generated: `wait` lets the requests
    # running finish on the old policy first (vLLM's pause mode "wait"), `keep` freezes them,
    # loads the new weights and lets them go on (pause mode "keep"): the version change is
    # recorded per token within each completion (docs/async.md).
    in_flight: str = "wait"
    # multi-turn episodes (docs/environments.md): the environment answering each policy turn,
    # as package.module:Class; empty, one turn per completion. `max_tokens` bounds each turn,
    # `episode_tokens` the policy's and the environment's tokens after the prompt together.
    environment: str = ""
    max_turns: int = 4
    episode_tokens: int = 256
    env_timeout: float = 10.0  # seconds per environment step; past it the episode fails
    env_workers: int = 8  # environment steps running at once

    @property
    def limits(self) -> Limits:  # an episode's bounds, as the runner takes them
        return Limits(self.max_turns, self.max_tokens, self.episode_tokens, self.env_timeout, self.env_workers)

    @property
    def sequences(self) -> int:
        """The sequences a step generates at once (the colocated engine's KV cache holds them)."""
        return self.prompts_per_step * self.num_generations

    def __post_init__(self) -> None:
        require(self.mode in ROLLOUT_MODES, "rollout.mode", self.mode, f"use one of {', '.join(ROLLOUT_MODES)}")
        require(self.in_flight in IN_FLIGHT, "rollout.in_flight", self.in_flight, f"use one of {', '.join(IN_FLIGHT)}")
        require(self.mode == "async" or self.in_flight == "wait", "rollout.in_flight", self.in_flight,
                "only rollout.mode: async syncs while generating; set rollout.mode=async or drop it")
        require(self.max_staleness >= 0, "rollout.max_staleness", self.max_staleness, "must be >= 0")
        require(self.mode == "async" or self.max_staleness == 0, "rollout.max_staleness", self.max_staleness,
                "only rollout.mode: async runs ahead of the policy; set rollout.mode=async or drop it")
        require(self.prompts_per_step >= 1, "rollout.prompts_per_step", self.prompts_per_step, "must be >= 1")
        require(self.num_generations >= 2, "rollout.num_generations", self.num_generations,
                "GRPO compares completions within a group: use >= 2")
        require(self.max_tokens >= 1, "rollout.max_tokens", self.max_tokens, "must be >= 1")
        require(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0")
        require(not self.environment or ":" in self.environment, "rollout.environment", self.environment,
                "write it as 'package.module:Class' (or leave it empty: single-turn)")
        try:
            self.limits
        except ValueError as err:  # Limits names the setting as this section does
            raise ConfigError(f"rollout.{err}") from None


@dataclass
class OptimConfig:
    steps: int = 50
    lr: float = 5e-3
    schedule: str = "constant"  # any transformers scheduler name: constant, linear, cosine, ...
    warmup_steps: int = 0
    grad_accum: int = 1
    num_iterations: int = 1  # optimizer steps per generation batch (GRPO's mu)
    clip_eps: float = 0.2
    beta: float = 0.0  # KL weight to the reference (the adapter disabled)
    is_cap: float = 2.0  # truncation of the engine/trainer importance weight
    is_mask: bool = False  # also drop tokens whose weight is outside [1/is_cap, is_cap]
    max_grad_norm: float = 1.0
    seed: int = 0
    # score a micro-batch as a prefix tree (`train/prefix.py`): every shared prefix (a group's
    # prompt, the system prompt, completions' first tokens) computed once; the same logprobs
    # and gradient
    shared_prefix: bool = True

    def __post_init__(self) -> None:
        require(self.steps >= 1, "optim.steps", self.steps, "must be >= 1")
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(self.grad_accum >= 1, "optim.grad_accum", self.grad_accum, "must be >= 1")
        require(self.num_iterations >= 1, "optim.num_iterations", self.num_iterations, "must be >= 1")
        require(self.clip_eps > 0, "optim.clip_eps", self.clip_eps, "must be > 0")
        require(self.beta >= 0, "optim.beta", self.beta, "must be >= 0")
        require(self.is_cap >= 1, "optim.is_cap", self.is_cap, "must be >= 1")


@dataclass
class EngineSection:
    kind: str = "colocated"  # colocated (vLLM in this process) or server (running servers)
    servers: list[str] = field(default_factory=list)  # server: URLs of `lorasync serve` servers
    # colocated: tokens per sequence (prompt + completion); unset: 512, capped by the model's
    # context. Servers set theirs at start (lorasync serve --max-model-len N).
    max_model_len: int | None = None
    # server: a file holding the servers' admin token (`lorasync serve --admin-token-file`),
    # which the sync routes need; unset: $LORASYNC_ADMIN_TOKEN, else the token (--token-file)
    admin_token_file: str | None = None

    def __post_init__(self) -> None:
        require(self.kind in ENGINE_KINDS, "engine.kind", self.kind, f"use one of {', '.join(ENGINE_KINDS)}")
        if self.admin_token_file is not None:
            require(
                isinstance(self.admin_token_file, str) and bool(self.admin_token_file.strip()),
                "engine.admin_token_file", self.admin_token_file,
                "write the path of a file holding the servers' admin token, or drop it",
            )
            require(
                self.kind == "server", "engine.admin_token_file", self.admin_token_file,
                "an admin token is for engine.kind: server; drop it or set engine.kind=server",
            )
        if self.kind == "server":
            require(
                bool(self.servers), "engine.servers", self.servers,
                "engine.kind: server needs the URLs of running `lorasync serve` servers, e.g. "
                "[http://127.0.0.1:8000] (their token: LORASYNC_TOKEN)",
            )
            for url in self.servers:
                require(
                    isinstance(url, str) and url.startswith(("http://", "https://")),
                    "engine.servers[]", url, "write each server as a URL, http://HOST:PORT",
                )
        else:
            require(
                not self.servers, "engine.servers", self.servers,
                "servers are for engine.kind: server; drop them or set engine.kind=server",
            )
        if self.max_model_len is not None:
            require(
                self.kind == "colocated", "engine.max_model_len", self.max_model_len,
                "servers set theirs at start (lorasync serve --max-model-len N); drop it here",
            )
            require(self.max_model_len >= 2, "engine.max_model_len", self.max_model_len, "must be >= 2")


@dataclass
class SyncSection:
    # streaming | merge-unmerge | adapter | factors | auto; unset: the engine kind's default
    # (streaming colocated, factors with servers)
    strategy: str | None = None
    # the weight-level verdict (sync/weight_check.py) after every sync, on engines that can read
    # their weights back (colocated): the first reads every tensor, each later one 1/N of them,
    # a rotating slice (every tensor is read every N syncs, a sync that changed nothing is seen
    # at once). 1: every tensor after every sync; 0: never. Reading a repacked CPU weight costs
    # a GEMM of hidden_size rows through its kernel.
    weight_check_slices: int = 10

    def __post_init__(self) -> None:
        require(self.weight_check_slices >= 0, "sync.weight_check_slices", self.weight_check_slices,
                "must be >= 0 (0: never, 1: every tensor after every sync)")
        if self.strategy is None:
            return  # TrainConfig picks the engine kind's default
        try:
            self.strategy = Strategy.parse(self.strategy, "sync.strategy")
        except ValueError as err:
            raise ConfigError(str(err)) from None


PARALLEL_MODES = ("ddp", "fsdp2")


@dataclass
class ParallelConfig:
    # On N ranks (torchrun, or `lorasync train --nproc N`; docs/distributed.md): ddp (each rank
    # holds the whole policy, gradients all-reduced) or fsdp2 (`fully_shard`: parameters,
    # gradients and optimizer state sharded over the ranks). One process: not used.
    mode: str = "ddp"
    # a collective waiting longer than this (a rank died or hangs) fails on every other rank
    timeout_seconds: float = 600.0

    def __post_init__(self) -> None:
        require(self.mode in PARALLEL_MODES, "parallel.mode", self.mode, f"use one of {', '.join(PARALLEL_MODES)}")
        require(self.timeout_seconds > 0, "parallel.timeout_seconds", self.timeout_seconds, "must be > 0")


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    rewards: list[RewardSpec]
    lora: LoraSettings = field(default_factory=LoraSettings)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineSection = field(default_factory=EngineSection)
    sync: SyncSection = field(default_factory=SyncSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output_dir: str = "runs/train"
    save_every: int = 0  # 0: only at the end
    logprob_tolerance: float | None = None  # engine/trainer health check; default per dtype

    def __post_init__(self) -> None:
        require(bool(self.rewards), "rewards", self.rewards, "list at least one reward function")
        require(
            self.rollout.prompts_per_step * self.rollout.num_generations % self.optim.grad_accum == 0,
            "optim.grad_accum",
            self.optim.grad_accum,
            f"must divide prompts_per_step * num_generations = "
            f"{self.rollout.prompts_per_step * self.rollout.num_generations}",
        )
        if self.sync.strategy is None:
            self.sync.strategy = default_strategy(self.engine.kind)
        try:  # pairs that cannot work are refused before anything starts
            check_pair(self.engine.kind, self.sync.strategy)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        require(self.save_every >= 0, "save_every", self.save_every, "must be >= 0")
        require(
            self.rollout.in_flight == "wait" or self.engine.kind == "server", "rollout.in_flight",
            self.rollout.in_flight,
            "keep freezes requests on running servers: set engine.kind=server, or in_flight=wait",
        )


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraSettings,
    "rollout": RolloutConfig,
    "optim": OptimConfig,
    "engine": EngineSection,
    "sync": SyncSection,
    "parallel": ParallelConfig,
}
# Keys that moved, and where to: refused with a message saying so.
_MOVED = {"sync_strategy": "sync.strategy (a section: `sync: {strategy: streaming}`)"}


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} = {values!r}: must be a mapping of fields")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown field; valid fields are {', '.join(sorted(known))}"
        )
    numbers = {f.name: f.type for f in dataclasses.fields(cls) if f.type in ("int", "float", "float | None")}
    values = dict(values)
    for name, kind in numbers.items():
        value = values.get(name)
        if value is None or isinstance(value, bool):
            continue
        try:  # YAML reads 1e-3 (no dot) as a string
            values[name] = int(value) if kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{name} = {value!r}: must be a number ({kind})") from None
        if kind == "int" and values[name] != float(value):
            raise ConfigError(f"{where}.{name} = {value!r}: must be a whole number")
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def config_from_dict(raw: dict) -> TrainConfig:
    """Build a TrainConfig from plain data (as parsed from YAML)."""
    raw = dict(raw)
    for old, new in _MOVED.items():
        if old in raw:
            raise ConfigError(f"{old} = {raw[old]!r}: this key moved to {new}")
    sections = {name: _build(cls, raw.pop(name, {}), name) for name, cls in _SECTIONS.items()}
    rewards = raw.pop("rewards", [])
    if not isinstance(rewards, list):
        raise ConfigError(f"rewards = {rewards!r}: must be a list of {{function, weight}}")
    specs = [_build(RewardSpec, r, f"rewards[{i}]") for i, r in enumerate(rewards)]
    top = {f.name for f in dataclasses.fields(TrainConfig)} - set(_SECTIONS) - {"rewards"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown field; valid top-level fields are "
            f"{', '.join(sorted(top | set(_SECTIONS) | {'rewards'}))}"
        )
    return TrainConfig(rewards=specs, **sections, **raw)


def apply_override(raw: dict, override: str) -> None:
    """Apply one `a.b=value` override (value parsed as YAML) to the raw config in place."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: write it as section.field=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML run file, apply `key=value` overrides, and validate."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {str(file)!r} does not exist")
    raw = yaml.safe_load(file.read_text()) or {}
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_to_dict(config: TrainConfig) -> dict:
    """The config as plain JSON-ready data (what `config_from_dict` reads back)."""
    raw = dataclasses.asdict(config)
    raw["sync"]["strategy"] = config.sync.strategy.value
    return raw
