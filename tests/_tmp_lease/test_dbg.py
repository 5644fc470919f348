import glob
from pathlib import Path
import pytest
from tests.server import test_lease as T
from tests.helpers import policy

class S:
    url = open("/tmp/leasedbg/url").read()
    log = Path(sorted(glob.glob("/tmp/leasedbg/m-server-*.log"), key=lambda p: Path(p).stat().st_mtime)[-1])

@pytest.mark.vllm
def test_dbg_gave_up():
    T.test_a_pause_the_client_gave_up_on_while_requests_drain_is_undone_by_the_client(S())

@pytest.mark.vllm
def test_dbg_killed(tmp_path):
    trainer = policy("/tmp/leasedbg/m", targets=["all-linear"], modules_to_save=["lm_head"])
    T.test_a_client_killed_with_its_payload_received_leaves_a_server_that_resumes_on_its_version(S(), trainer, tmp_path)

@pytest.mark.vllm
def test_dbg_four():
    T.test_four_openai_clients_see_no_failed_request_through_a_lease_expiry(S())
