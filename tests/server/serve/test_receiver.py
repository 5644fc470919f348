"""The receiver's own checks, without a server: non-finite values are refused before anything
is loaded (a real server refusing them: tests/server/client/test_engine.py)."""

import math

import pytest
import torch

from lorasync.server.serve.receiver import refuse_non_finite
from lorasync.server.transports.wire import PayloadError
from lorasync.sync.base import Record

B, A = torch.ones(4, 2), torch.ones(2, 3)


def test_finite_records_pass():
    refuse_non_finite([Record("q.weight", (B, A), 2.0), Record("lm_head.weight", (torch.zeros(3, 3),), None)])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_is_refused_naming_the_record(bad):
    b = B.clone()
    b[1, 1] = bad
    with pytest.raises(PayloadError, match=r"k.weight: 1 non-finite value\(s\).*LORASYNC_ALLOW_NON_FINITE=1"):
        refuse_non_finite([Record("q.weight", (B, A), 2.0), Record("k.weight", (b, A), 2.0)])


def test_a_non_finite_scale_is_refused():
    with pytest.raises(PayloadError, match="q.weight: scale nan is not finite"):
        refuse_non_finite([Record("q.weight", (B, A), math.nan)])
