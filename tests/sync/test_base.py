"""The sync's shared types (sync/base.py): a strategy is parsed from its name, and any other name
is refused naming the field and every choice, by `WeightSync` too; a `WeightStream` yields the
tensors it named, in order, and refuses anything else. (The Protocols, through the fakes that
implement them: test_weight_sync.py.)"""

import pytest
import torch

from lorasync.sync.base import Strategy, WeightStream
from lorasync.sync.weight_sync import WeightSync


def test_strategy_parse_takes_every_name_and_refuses_others_naming_the_field():
    for strategy in Strategy:
        assert Strategy.parse(strategy.value) is strategy is Strategy.parse(strategy)
    with pytest.raises(ValueError, match=r"sync.strategy must be one of streaming, merge-unmerge, "
                                         r"adapter, factors, auto, got 'merged'"):
        Strategy.parse("merged", "sync.strategy")
    with pytest.raises(ValueError, match="strategy must be one of"):
        WeightSync(None, None, strategy="fastest")


def test_a_weight_stream_yields_what_it_named_in_order_and_refuses_anything_else():
    pairs = [("a", torch.ones(1)), ("b", torch.zeros(2))]
    doubled = WeightStream(["a", "b"], iter(pairs)).map(lambda t: t * 2)
    assert doubled.names == ["a", "b"]
    assert [(n, t.tolist()) for n, t in doubled] == [("a", [2.0]), ("b", [0.0, 0.0])]
    for names, message in [(["b", "a"], "tensor 0 is 'a', but it named 'b'"), (["a"], "named 'nothing more'"),
                           (["a", "b", "c"], "named 3 tensors, gave 2")]:
        with pytest.raises(ValueError, match=message):
            list(WeightStream(names, iter(pairs)))
