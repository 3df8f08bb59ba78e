"""Hostile clients on loopback: stalled heads and bodies, connection floods, forged log lines, wrong keys.

Each test names what a client would notice if the defence broke: a connection held forever, a SIGTERM
that never ends, /health that stops answering, a log line an attacker wrote. Every loop is bounded in
count and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import Server

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT = 1.5
SLOTS = 4
CONNECTIONS = 8


@pytest.fixture(scope="module")
def guarded(m3_checkpoint, tmp_path_factory):
    """Short read and keep-alive deadlines, 8 connections, 4 input slots held ~1 s per request, a key."""
    server = Server(
        [
            "--model", str(m3_checkpoint), "--devices", "cpu", "--dtype", "fp32", "--api-key", KEY,
            "--read-timeout", str(READ_TIMEOUT), "--timeout-keep-alive", "1",
            "--limit-concurrency", str(CONNECTIONS), "--max-concurrent-requests", str(SLOTS),
            "--batch-wait-ms", "1000",
        ],
        tmp_path_factory.mktemp("logs") / "guarded.log",
    )
    yield server
    server.stop()


def _connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_all(sock: socket.socket, deadline: float = 10) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection; (data, closed) within `deadline` seconds."""
    data = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        sock.settimeout(max(0.05, end - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def _metric(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + " ") and not labels:
            total += float(line.split()[1])
    return total


# -- 3. stalled uploads ------------------------------------------------------------------------------


def test_a_stalled_body_gets_408_and_its_connection_closed(guarded):
    before = _metric(guarded, "bgeserve_requests_total", route="/embed", status="408")
    with _connect(guarded) as sock:
        sock.sendall(_head("/embed", 100, f"Authorization: Bearer {KEY}\r\n") + b'{"inputs": ')
        started = time.monotonic()
        data, closed = _read_all(sock, deadline=READ_TIMEOUT + 5)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert closed and time.monotonic() - started < READ_TIMEOUT + 3
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error_type"] == "Timeout" and "--read-timeout" in body["error"]
    assert _metric(guarded, "bgeserve_requests_total", route="/embed", status="408") == before + 1


@pytest.mark.parametrize("sent", [b"", b"POST /embed HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half-a-head"])
def test_a_connection_that_never_finishes_its_head_is_closed(guarded, sent):
    with _connect(guarded) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        data, closed = _read_all(sock, deadline=READ_TIMEOUT + 5)
    assert closed and data == b""
    assert time.monotonic() - started < READ_TIMEOUT + 3


def test_an_idle_keep_alive_connection_is_closed(guarded):
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        _, closed = _read_all(sock, deadline=6)
    assert closed and time.monotonic() - started < 4  # --timeout-keep-alive 1


def test_sigterm_ends_even_with_a_stalled_upload(m3_checkpoint, tmp_path):
    server = Server(
        ["--model", str(m3_checkpoint), "--devices", "cpu", "--dtype", "fp32",
         "--read-timeout", "600", "--timeout-graceful-shutdown", "2"],
        tmp_path / "stalled-shutdown.log",
    )
    with _connect(server) as sock:
        sock.sendall(_head("/embed", 1000) + b'{"inputs": "never fini')
        time.sleep(0.5)  # the app is now waiting for the rest of the body
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        finally:
            server.stop()
        assert time.monotonic() - started < 15, server.log()
    assert "timeout graceful shutdown exceeded" in server.log()


# -- 4. connection cap, descriptor limit, log floods ---------------------------------------------------


def test_connections_past_the_cap_are_answered_503_at_once(guarded):
    idle = [_connect(guarded) for _ in range(CONNECTIONS + 2)]
    try:
        time.sleep(0.2)
        started = time.monotonic()
        response = httpx.get(f"{guarded.url}/health", timeout=5)
        assert response.status_code == 503
        assert time.monotonic() - started < 2
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.get(f"{guarded.url}/health", timeout=5).status_code == 200:
            break
        time.sleep(0.1)
    assert httpx.get(f"{guarded.url}/health", timeout=5).status_code == 200


def test_at_the_descriptor_limit_health_still_answers_and_the_log_stays_small(m3_checkpoint, tmp_path):
    # 256 descriptors: the default connection cap leaves 128 of them for the process itself.
    server = Server(["--model", str(m3_checkpoint), "--devices", "cpu", "--dtype", "fp32"],
                    tmp_path / "fd-limit.log", open_files=256)
    try:
        line = next(line for line in server.log().splitlines() if "settings: " in line)
        assert json.loads(line.split("settings: ", 1)[1])["limit_concurrency"] == 128
        sockets = []
        try:
            for _ in range(300):
                sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            time.sleep(1)
            started = time.monotonic()
            status = httpx.get(f"{server.url}/health", timeout=5).status_code
            assert status in (200, 503) and time.monotonic() - started < 5
        finally:
            for sock in sockets:
                sock.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        log = server.log()
        assert len(log) < 50_000 and log.count("Traceback") == 0, log[-3000:]
    finally:
        server.stop()


def test_a_flood_of_one_log_message_is_cut_to_a_few_lines_a_second(guarded):
    marker = "Invalid HTTP request received."
    before = guarded.log().count(marker)
    started = time.monotonic()
    for _ in range(200):
        with _connect(guarded) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            _read_all(sock, deadline=5)
    seconds = time.monotonic() - started
    time.sleep(1.1)
    with _connect(guarded) as sock:  # the next one let through says how many were dropped
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        _read_all(sock, deadline=5)
    time.sleep(0.3)
    log = guarded.log()
    logged = log.count(marker) - before
    assert logged <= 5 * (seconds + 3), (logged, seconds)
    assert re.search(r"Invalid HTTP request received\. \[\d+ more like this dropped\]", log)
    # The request log itself is never cut, even for lines that read alike.
    before = guarded.log().count("GET /v1/models 200")
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=10) as client:
        for _ in range(20):
            assert client.get("/v1/models").status_code == 200
    time.sleep(0.3)
    assert guarded.log().count("GET /v1/models 200") - before == 20


# -- 5. empty API key ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--api-key", ""], {}), ([], {"BGESERVE_API_KEY": ""}), (["--api-key", "  "], {})],
    ids=["flag", "variable", "blank"],
)
def test_an_empty_api_key_refuses_to_start(argv, env):
    result = subprocess.run(
        [sys.executable, "-m", "bgeserve", "serve", "--port", "0", *argv],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert "empty" in result.stderr and "Traceback" not in result.stderr


# -- 6. log lines a client cannot forge -------------------------------------------------------------------


def test_control_characters_of_the_path_are_escaped_in_the_plain_log(guarded):
    forged = "2024-01-01 00:00:00,000 INFO bgeserve.api: GET /admin 200"
    path = "/x%0a" + forged.replace(" ", "%20") + "%1b[31m"
    with _connect(guarded) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data, _ = _read_all(sock)
    assert data.startswith(b"HTTP/1.1 401")
    time.sleep(0.3)
    log = guarded.log()
    assert not any(line.startswith(forged) for line in log.splitlines())
    assert "\x1b" not in log
    assert "GET /x\\n2024-01-01" in log and "\\x1b[31m 401" in log


# -- 7. the key before the body ----------------------------------------------------------------------------


def test_the_api_key_is_checked_before_the_body_is_read(guarded):
    wrong = {"Authorization": "Bearer nope", "Content-Type": "application/json"}
    malformed = httpx.post(f"{guarded.url}/embed", content=b'{"inputs": ', headers=wrong, timeout=10)
    assert malformed.status_code == 401 and malformed.json()["error_type"] == "Unauthorized"
    openai = httpx.post(f"{guarded.url}/v1/embeddings", content=b"\xff\xfe", headers=wrong, timeout=10)
    assert openai.status_code == 401 and openai.json()["error"]["code"] == "invalid_api_key"
    # Too large, and never sent: still told 401 at once, not 413 nor kept waiting.
    with _connect(guarded) as sock:
        sock.sendall(_head("/embed", 10**9, "Authorization: Bearer nope\r\n"))
        started = time.monotonic()
        first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 401") and time.monotonic() - started < 1


# -- 8. Retry-After, HEAD /health ----------------------------------------------------------------------------


def test_429_says_when_to_retry_in_both_families_and_tokenize_takes_slots(guarded):
    async def scenario():
        async with httpx.AsyncClient(base_url=guarded.url, headers=AUTH, timeout=60) as client:
            # A request holds at most a quarter of the 4 slots: four of them fill every slot for ~1 s.
            holders = [asyncio.create_task(client.post("/embed", json={"inputs": f"hold {i}"})) for i in range(SLOTS)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _inflight(guarded) < SLOTS:
                await asyncio.sleep(0.02)
            probes = await asyncio.gather(
                client.post("/tokenize", json={"inputs": "no slot for me"}),
                client.post("/v1/embeddings", json={"input": "nor for me"}),
            )
            held = await asyncio.gather(*holders)
            return probes, held

    (tokenize, openai), held = asyncio.run(scenario())
    assert [r.status_code for r in held] == [200] * SLOTS
    assert tokenize.status_code == 429 and tokenize.json()["error_type"] == "Overloaded"
    assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error"
    assert tokenize.headers["retry-after"] == "1" and openai.headers["retry-after"] == "1"
    head = httpx.head(f"{guarded.url}/health", timeout=10)
    assert head.status_code == 200 and head.content == b""


def _inflight(server: Server) -> float:
    return _metric(server, "bgeserve_inflight_inputs")


# -- 9. aborted uploads, long model names ----------------------------------------------------------------


def test_an_upload_aborted_mid_body_counts_as_499_not_500(guarded):
    before = _metric(guarded, "bgeserve_requests_total", route="/embed", status="499")
    with _connect(guarded) as sock:
        sock.sendall(_head("/embed", 1000, f"Authorization: Bearer {KEY}\r\n") + b'{"inputs": "gone')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _metric(guarded, "bgeserve_requests_total", route="/embed", status="499") > before:
            break
        time.sleep(0.1)
    assert _metric(guarded, "bgeserve_requests_total", route="/embed", status="499") == before + 1
    assert _metric(guarded, "bgeserve_requests_total", route="/embed", status="500") == 0
    assert " /embed 499 " in guarded.log()


def test_a_client_supplied_model_name_is_logged_capped(guarded):
    name = "m" * 1_000_000
    response = httpx.post(
        f"{guarded.url}/v1/embeddings", json={"input": "hi", "model": name}, headers=AUTH, timeout=60
    )
    assert response.status_code == 200
    time.sleep(0.3)
    lines = [line for line in guarded.log().splitlines() if "request names model" in line]
    assert lines and max(len(line) for line in lines) < 400
    assert "(1000000 characters)" in lines[-1]
