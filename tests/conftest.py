"""Shared fixtures: tiny local models (built once per session) and real vLLM engines.

Engines are cached per (model folder, dtype) for the whole session because each costs about
10 s to build on CPU; tests that change an engine's weights re-sync before they verify.
"""

from __future__ import annotations

import pytest
import torch

from lorasync.tiny import make_tiny_model

MODELS = {
    # name: (architecture, tied embeddings)
    "qwen2-tied": ("qwen2", True),
    "llama": ("llama", False),
    "qwen3": ("qwen3", False),
    "qwen2": ("qwen2", False),
    "gpt2": ("gpt2", True),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) -> folder of a tiny model from MODELS, built once per session."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            arch, tied = MODELS[name]
            out = tmp_path_factory.mktemp(name)
            built[name] = str(make_tiny_model(out, arch=arch, tie_word_embeddings=tied))
        return built[name]

    return get


@pytest.fixture(scope="session")
def engine_for():
    """engine_for(model_dir, dtype) -> a real colocated vLLM engine, cached for the session."""
    from lorasync.engine import ColocatedEngine, EngineConfig

    engines = {}

    def get(model_dir: str, dtype: str = "float32"):
        key = (model_dir, dtype)
        if key not in engines:
            engines[key] = ColocatedEngine(EngineConfig(model=model_dir, dtype=dtype))
        return engines[key]

    yield get
    for engine in engines.values():
        engine.close()


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """The demo's base model: a tiny Qwen2 pre-trained briefly (about 45 s, once a session)."""
    from lorasync.demo import pretrain

    out = make_tiny_model(tmp_path_factory.mktemp("demo") / "base", arch="qwen2")
    pretrain(out)
    return out
