"""The client's HTTP control of a server (`server/client/control.py`), through the handshake
with a stand-in server on loopback (`fake_server` of test_tcp.py): every field of the info a
server reports is checked for its type before it is used (`ServerInfo.from_report`), and an
answer to a control request is read to at most MAX_RESPONSE_BYTES, then checked
(`Control.call`, `Control.json`); each failure is a ServerSyncError naming the server."""

import pytest

from lorasync.server.client.control import MAX_RESPONSE_BYTES, Control, ServerSyncError
from lorasync.server.transports.tcp import TcpTransport
from tests.server.transports.test_tcp import GOOD_INFO, expect_handshake_error, fake_server, info_reply


@pytest.mark.parametrize(
    "change,message",
    [
        ({"vocab_size": None}, "field 'vocab_size' must be a positive integer, got None"),
        ({"workers": 0}, "field 'workers' must be a positive integer, got 0"),
        ({"max_payload_bytes": "1"}, "field 'max_payload_bytes' must be a positive integer, got '1'"),
        ({"dtype": "float8"}, "field 'dtype' must be one of"),
        ({"layout": {"w": [2, -3]}}, "field 'layout' must be an object of names to shapes"),
        ({"layout": ["w"]}, "field 'layout' must be an object of names to shapes"),
        ({"groups": [["w", 1]]}, "field 'groups' must be a list of lists of names"),
        ({"merge_kernel": None}, "field 'merge_kernel' must be a string"),
    ],
    ids=["missing", "zero", "string-int", "dtype", "negative-size", "layout-list", "group-name", "kernel"],
)
def test_the_client_checks_every_field_of_the_server_info(change, message):
    """A field missing or of the wrong type is the server's error, naming the field and the
    value, not a KeyError or TypeError later. The good info passes (the check can pass)."""
    server = fake_server(info_reply(GOOD_INFO))
    url = f"http://127.0.0.1:{server.server_port}"
    control = Control("token", timeout=5)
    try:
        info = TcpTransport(control, "127.0.0.1", compress=False).handshake(url)
        assert (info.layout, info.model, info.dtype) == ({"w": (2, 3)}, "m", "float32")
    finally:
        control.close()
        server.shutdown()
        server.server_close()
    expect_handshake_error(fake_server(info_reply(GOOD_INFO | change)), message)


@pytest.mark.parametrize(
    "models,message",
    [
        (b"[" * 50 + b"x" * (2 << 20), f"the answer is over the client's limit of {MAX_RESPONSE_BYTES} bytes"),
        (b"{not json", "the answer is not JSON"),
        (b'{"data": []}', "no model id in"),
    ],
    ids=["huge", "bad-json", "no-model"],
)
def test_the_client_caps_and_checks_http_answers(models, message):
    """An answer to a control request is read to at most MAX_RESPONSE_BYTES, even when no
    length is announced, then checked: a server cannot make the client allocate what it
    likes, nor fail it with a KeyError."""
    expect_handshake_error(fake_server(info_reply(GOOD_INFO), models), message)
