"""`open_engine` (`backend/open.py`), with the engines it builds replaced by recorders: a
colocated engine gets the run's model settings and vLLM's LoRA support only for the strategies
that serve adapters (`adapter`, `auto`; rank at least `MAX_LORA_RANK`), servers get their urls,
tokens and in-flight policy, and a strategy the kind does not take is refused before anything
is built. Real engines opened this way: tests/train/test_engines.py."""

import inspect
import json

import pytest

from lorasync.backend import open as backend_open
from lorasync.backend.open import open_engine
from lorasync.server.client.engine import ServerEngine
from lorasync.sync.base import Strategy
from lorasync.sync.policy import MAX_LORA_RANK


@pytest.fixture
def built(monkeypatch):
    """What `open_engine` builds: each colocated engine's EngineConfig, each ServerEngine's arguments."""
    made = []
    monkeypatch.setattr(backend_open, "ColocatedEngine", lambda config: made.append(config) or "colocated")
    monkeypatch.setattr(backend_open, "ServerEngine", lambda *args, **kwargs: made.append((args, kwargs)) or "server")
    return made


@pytest.fixture
def model_dir(tmp_path):
    """A model folder as EngineConfig reads it: config.json alone (context 256 tokens)."""
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "max_position_embeddings": 256}
    ))
    return str(tmp_path)


@pytest.mark.parametrize("strategy,lora", [(Strategy.STREAMING, False), (Strategy.MERGE_UNMERGE, False),
                                           (Strategy.ADAPTER, True), (Strategy.AUTO, True)])
def test_a_colocated_engine_serves_lora_only_for_the_strategies_that_need_it(built, model_dir, strategy, lora):
    engine = open_engine("colocated", strategy, model_dir, dtype="bfloat16", seed=3, lora_rank=4,
                         max_model_len=128, batch_sequences=8)
    assert engine == "colocated" and len(built) == 1
    config = built[0]
    assert (config.model, config.dtype, config.seed, config.max_model_len, config.batch_sequences) == (
        model_dir, "bfloat16", 3, 128, 8)
    assert config.enable_lora is lora and config.max_lora_rank == MAX_LORA_RANK  # rank 4: the default's
    open_engine("colocated", strategy, model_dir, lora_rank=2 * MAX_LORA_RANK)
    assert built[1].max_lora_rank == 2 * MAX_LORA_RANK  # a larger adapter raises it


def test_servers_get_their_urls_tokens_and_in_flight_policy(built):
    urls = ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    engine = open_engine("server", Strategy.FACTORS, servers=urls, token="t", admin_token="a", in_flight="keep")
    assert engine == "server"
    (args, kwargs), = built
    given = inspect.signature(ServerEngine).bind(*args, **kwargs).arguments
    assert given == {"urls": urls, "token": "t", "in_flight": "keep", "admin_token": "a"}


@pytest.mark.parametrize("kind,strategy", [("colocated", Strategy.FACTORS), ("server", Strategy.ADAPTER),
                                           ("server", Strategy.AUTO), ("remote", Strategy.STREAMING)])
def test_a_strategy_the_kind_does_not_take_is_refused_before_anything_is_built(built, model_dir, kind, strategy):
    with pytest.raises(ValueError, match="engine.kind"):
        open_engine(kind, strategy, model_dir, servers=["http://127.0.0.1:8000"])
    assert built == []
