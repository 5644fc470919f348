"""Which kind of engine takes which strategy (sync/kinds.py, the one table the config, the
sync-check command and `backend/open.py` check by): each kind takes its own and defaults to the
first, and a refused pair names both fields, what the kind takes and the kind that takes the
strategy. Pure data: no model, no engine."""

import pytest

from lorasync.sync.base import Strategy
from lorasync.sync.kinds import STRATEGIES, check_pair, default_strategy


def test_each_engine_kind_takes_its_strategies_and_defaults_to_the_first():
    assert default_strategy("colocated") is Strategy.STREAMING
    assert default_strategy("server") is Strategy.FACTORS
    for kind, strategies in STRATEGIES.items():
        for strategy in Strategy:
            if strategy in strategies:
                check_pair(kind, strategy)
            else:
                with pytest.raises(ValueError, match=f"'{strategy.value}' does not work with "
                                                     f"engine.kind = '{kind}'"):
                    check_pair(kind, strategy)
    assert Strategy.FACTORS not in STRATEGIES["colocated"]
    assert Strategy.ADAPTER not in STRATEGIES["server"] and Strategy.AUTO not in STRATEGIES["server"]


def test_a_refused_pair_names_both_fields_and_the_kind_that_takes_it():
    with pytest.raises(ValueError, match=r"sync.strategy = 'factors' does not work with engine.kind = "
                                         r"'colocated', which takes streaming, merge-unmerge, adapter, "
                                         r"auto: use one of those, or engine.kind = 'server'"):
        check_pair("colocated", Strategy.FACTORS)
    with pytest.raises(ValueError, match="or engine.kind = 'colocated'"):
        check_pair("server", Strategy.ADAPTER)
    with pytest.raises(ValueError, match="engine.kind must be one of colocated, server, got 'remote'"):
        check_pair("remote", Strategy.STREAMING)
