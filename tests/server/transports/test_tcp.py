"""The TCP transport's client half (`server/transports/tcp.py`), without vLLM: the handshake
through a stand-in server on loopback (`fake_server`: it connects back, proves the nonce and
sends what a server's info would be), whose declared info the client caps and checks before
using it (`read_info`); a transfer broken off is reset, not ended (`_abandon`); and a `Fanout`
writes every stream and names the one that broke. Syncs through real servers, the receiver's
half included: tests/server/client/test_engine.py and tests/server/serve/test_live_fuzz.py."""

import json
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lorasync.server.client.control import Control, ServerSyncError
from lorasync.server.transports import tcp as transport_tcp
from lorasync.server.transports.tcp import BrokenStream, Fanout, TcpTransport
from lorasync.server.transports.wire import MAGIC, MAX_INFO_BYTES
from tests import helpers


def fake_server(reply: bytes, models: bytes = b'{"data": [{"id": "m"}]}') -> ThreadingHTTPServer:
    """A stand-in for a server's handshake on loopback: on POST it connects back to the
    client's listener, proves the nonce, then sends `reply` where a real server's info goes;
    GET answers `models` (chunked, as a streaming server would: no length announced)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(models), 1 << 16):
                piece = models[i : i + (1 << 16)]
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                except OSError:  # the client stopped reading
                    return
            self.wfile.write(b"0\r\n\r\n")

        def do_POST(self) -> None:
            endpoint = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["init_info"]
            with socket.create_connection((endpoint["host"], endpoint["port"])) as sock:
                try:
                    sock.sendall(MAGIC + bytes.fromhex(endpoint["nonce"]) + reply)
                except OSError:
                    pass
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # polled often: `shutdown()` waits up to one interval (0.5 s by default, per server)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


@pytest.mark.parametrize(
    "reply,message",
    [
        (struct.pack("<Q", 1 << 62), f"declares {1 << 62} bytes of server info, over the client's limit of {MAX_INFO_BYTES}"),
        (struct.pack("<Q", 3) + b"{x}", "server info is not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "must be a JSON object"),
    ],
    ids=["huge", "bad-json", "not-an-object"],
)
def test_the_client_caps_and_checks_the_server_info_it_reads(reply, message):
    expect_handshake_error(fake_server(reply), message)


GOOD_INFO = {
    "layout": {"w": [2, 3]}, "groups": [["w"]], "dtype": "float32", "vocab_size": 8,
    "max_payload_bytes": 1 << 20, "workers": 1, "merge_kernel": "addmm",
}


def info_reply(info: dict) -> bytes:
    body = json.dumps(info).encode()
    return struct.pack("<Q", len(body)) + body


def expect_handshake_error(server: ThreadingHTTPServer, message: str) -> None:
    """The handshake with `server` raises ServerSyncError naming its URL and saying `message`."""
    url = f"http://127.0.0.1:{server.server_port}"
    control = Control("token", timeout=5)
    try:
        with pytest.raises(ServerSyncError, match=re.escape(message)) as err:
            TcpTransport(control, "127.0.0.1", compress=False).handshake(url)
        assert str(err.value).startswith(url)
    finally:
        control.close()
        server.shutdown()
        server.server_close()


def test_an_abandoned_transfer_is_reset_not_ended():
    """What a transfer broken off on the client's side leaves the receiver: a reset, where a
    plain close reads as the end of a complete payload. Checked able to fail: without the
    zero linger the peer reads b"" (the end of the stream)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours = listener.accept()[0]
    ours.sendall(b"all of it")
    transport_tcp._abandon([ours], [])
    assert theirs.recv(9) == b"all of it"
    with pytest.raises(ConnectionResetError):
        theirs.recv(1)
    theirs.close()


class _Broken:
    def sendall(self, data) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_fanout_writes_every_stream_and_names_the_one_that_broke():
    first, second = helpers._Recorder(), helpers._Recorder()
    Fanout([first, second]).sendall(b"abc")
    assert first.data == second.data == b"abc"
    with pytest.raises(BrokenStream) as broken:
        Fanout([first, _Broken(), second]).sendall(b"d")
    assert broken.value.index == 1 and isinstance(broken.value.error, BrokenPipeError)
