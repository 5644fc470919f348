"""Fixtures of the server tests: real `lorasync serve` servers on loopback (tests/helpers.py
starts them) and the trainer policy most tests sync from.

`servers`: two servers of the module's tiny model (`SERVER_MODEL` in the test module, default
qwen2), started once per module, restarted where an earlier test left one dead. `server`: the
session's one qwen2 server (`qwen2_server`), up. `trainer`: a fresh qwen2 policy per test,
all-linear LoRA and a trained lm_head copy (a module syncing another model defines its own).
"""

import pytest

from tests.helpers import alive, policy, running_servers


@pytest.fixture(scope="module")
def _servers(request, tiny_model):
    with running_servers(tiny_model(getattr(request.module, "SERVER_MODEL", "qwen2"))) as both:
        yield both


@pytest.fixture
def servers(_servers):
    return alive(_servers)


@pytest.fixture
def server(qwen2_server):
    """The session's server, up: one an earlier test killed is started again."""
    if qwen2_server.process.poll() is not None:
        qwen2_server.start().wait()
    return qwen2_server


@pytest.fixture
def trainer(tiny_model):
    """This test's own policy: all-linear LoRA and a trained lm_head copy."""
    return policy(tiny_model("qwen2"), targets=["all-linear"], modules_to_save=["lm_head"])
