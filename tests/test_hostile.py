"""A hostile client on loopback against a real `eqm serve`: slow and ambiguous bodies, oversized heads,
too many connections, bad resume ids, and the Nagle delay on a reused connection."""
from __future__ import annotations

import http.client
import json
import socket
import statistics
import time
import uuid

import httpx
import pytest

from clientstack import serve, stop
from models import resolve_checkpoint
from service.embedded_redis import free_port

pytestmark = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(), reason="the bundled digits model is missing")
BODY_DEADLINE_S = 3
MAX_CONNECTIONS = 24


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    proc = serve(redis_server.url, port, log, EQM_KEY_PREFIX=f"hostile{uuid.uuid4().hex[:6]}",
                 EQM_BODY_DEADLINE_S=str(BODY_DEADLINE_S), EQM_BODY_TIMEOUT_S="30",
                 EQM_MAX_CONNECTIONS=str(MAX_CONNECTIONS))
    yield port
    stop(proc)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_response(sock: socket.socket, timeout_s: float = 15) -> tuple[bytes, bool]:
    """(everything the server sent, whether it closed the connection) within ``timeout_s``."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except socket.timeout:
        return data, False


def test_a_reused_connection_has_no_nagle_delay(api):
    """Keep-alive requests on one connection answer in a few ms; with Nagle's algorithm on the listening
    socket, each one after the first waited ~40 ms for the client's delayed ACK."""
    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
    times = []
    for _ in range(25):
        t0 = time.perf_counter()
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - t0)
        assert resp.status == 200
    conn.close()
    reused = times[1:]
    assert statistics.median(reused) < 0.025, [round(t * 1000, 1) for t in reused]


def test_a_slow_body_is_cut_at_the_whole_body_deadline(api):
    """One byte a second never trips the per-chunk timeout (30 s here), but the whole body must arrive
    within EQM_BODY_DEADLINE_S: 408, and the connection is closed."""
    sock = _connect(api)
    sock.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 5000\r\n\r\n{")
    t0 = time.monotonic()
    sock.settimeout(0.05)
    data = b""
    while time.monotonic() - t0 < BODY_DEADLINE_S + 10:
        try:
            sock.sendall(b" ")
        except OSError:
            break
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        except socket.timeout:
            pass
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    rest, closed = _read_response(sock, 5)
    data += rest
    sock.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"EQM_BODY_DEADLINE_S" in data
    assert BODY_DEADLINE_S - 0.5 < elapsed < BODY_DEADLINE_S + 4


def test_content_length_with_chunked_is_refused_and_closed(api):
    """RFC 9112 6.3: a request with both framings is ambiguous; answer 400 and close the connection."""
    sock = _connect(api)
    sock.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    data, closed = _read_response(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"Content-Length and Transfer-Encoding" in data and closed


def test_a_head_over_the_limit_in_one_write_is_refused(api):
    """The 64 KiB head limit holds whether the head arrives in pieces or in one write."""
    sock = _connect(api)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    data, closed = _read_response(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert closed


def test_connections_past_the_cap_get_503(api):
    """Connections holding unfinished bodies count against EQM_MAX_CONNECTIONS: past it, requests are
    answered 503 and their connections closed at once, instead of the process holding them all."""
    extra = 8
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + extra):
            sock = _connect(api)
            sock.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            held.append(sock)
        refused = 0
        for sock in held:
            data, closed = _read_response(sock, 0.5)
            refused += data.startswith(b"HTTP/1.1 503") and closed
        assert refused >= extra
    finally:
        for sock in held:
            sock.close()
    end = time.monotonic() + 10
    while time.monotonic() < end:                     # the slots come back once the connections close
        if httpx.get(f"http://127.0.0.1:{api}/healthz", timeout=10).status_code == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the API did not take connections again after the held ones closed")


def _hold_unfinished_bodies(port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = _connect(port)
        sock.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        held.append(sock)
    time.sleep(0.3)                                  # every one accepted and counted by the server
    return held


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed) of one GET on a new connection."""
    sock = _connect(port)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data, closed = _read_response(sock, 5)
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, closed


def test_operations_endpoints_are_answered_past_the_cap_and_others_get_a_json_503(api):
    """At the cap, a liveness probe must not fail (it would restart a healthy API): /healthz, /readyz and
    /metrics are answered; any other request gets a JSON 503 with Retry-After, like every other error."""
    held = _hold_unfinished_bodies(api, MAX_CONNECTIONS)
    try:
        status, _, body, _ = _get(api, "/healthz")
        assert status == 200 and b'"ok"' in body
        status, _, body, _ = _get(api, "/metrics")
        assert status == 200 and b"eqm_api_requests_total" in body
        status, _, body, _ = _get(api, "/readyz")
        assert status in (200, 503) and b'"status"' in body          # its own answer, not the cap's
        status, headers, body, closed = _get(api, "/v1/models")
        assert status == 503 and headers["content-type"] == "application/json" and headers["retry-after"]
        assert "EQM_MAX_CONNECTIONS" in json.loads(body)["detail"]
    finally:
        for sock in held:
            sock.close()


def test_the_cap_counts_no_connection_twice(api):
    """With one connection fewer than the cap held, a new request is served: the asking connection is
    one of the cap's, not one more than it."""
    held = _hold_unfinished_bodies(api, MAX_CONNECTIONS - 1)
    try:
        status, _, body, _ = _get(api, "/v1/models")
        assert status == 200, body[:200]
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("last_id", ["99999999999999999999999-0", "３-0", "1-٣", "18446744073709551616-0"])
def test_a_bad_last_event_id_replays_from_the_start(api, last_id):
    """A resume id Redis cannot take is ignored (the whole stream is replayed), never an error event."""
    base = f"http://127.0.0.1:{api}"
    job = httpx.post(f"{base}/v1/generations", json={"labels": [3], "max_steps": 3}, timeout=30).json()
    with httpx.stream("GET", f"{base}/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": last_id.encode()},
                      timeout=60) as resp:
        assert resp.status_code == 200
        text = "".join(resp.iter_text())
    assert "event: error" not in text and "event: queued" in text and "event: done" in text, text[-500:]


def test_small_hostile_inputs_get_plain_refusals(redis_url):
    """A key with a trailing U+00A0 is another key; non-ASCII digits are not class indices; a JSON body
    over its fixed cap names no setting that would not raise it; edits and scores say why a multipart body
    was unreadable; the playground page may not be framed and loads nothing from elsewhere."""
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(redis_url=redis_url, api_keys=("key-one",)))) as c:
        assert c.get("/v1/models", headers={"Authorization": "Bearer key-one"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer key-one\u00a0".encode("latin-1")}).status_code == 401
    with TestClient(create_app(Settings(redis_url=redis_url))) as c:
        for label in ("３", "٣"):
            resp = c.post("/v1/generations", json={"labels": [label]})
            assert resp.status_code == 422 and "unknown class" in resp.json()["message"], resp.text
        resp = c.post("/v1/generations", content=b'{"labels": [1], "x": "' + b"a" * 70_000 + b'"}',
                      headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and "EQM_MAX_UPLOAD_BYTES" not in resp.text, resp.text
        for route in ("/v1/scores", "/v1/images/edits"):
            resp = c.post(route, content=b"--b\r\nbroken header line\r\n\r\nx\r\n--b--\r\n",
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert resp.status_code == 400, resp.text
            assert "Invalid multipart data" in resp.text and "field 'image'" in resp.text
        page = c.get("/")
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


@pytest.mark.parametrize("raw,reason", [(b"\x00" * 5, "the body is not"), (b'{"labels": ["\xff"]}', "not UTF-8"),
                                        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
                                        (b'{"n": ' + b"9" * 5000 + b"}", "too many digits")],
                         ids=["nul", "not-utf8", "deep", "huge-int"])
def test_undecodable_json_is_a_prompt_422_on_a_real_server(api, raw, reason):
    """Bodies the JSON decoder raises on (not a decode error): a 422 with the reason, at once; the server
    does not wait for a body that was already read."""
    resp = httpx.post(f"http://127.0.0.1:{api}/v1/generations", content=raw,
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 422, resp.text
    assert reason in resp.json()["message"], resp.json()
