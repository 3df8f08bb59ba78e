"""Back-pressure: full slots give 429 at once, a client that leaves frees its slots, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from .conftest import Server

SLOTS = 4  # inputs per request here, and the most slots one request holds: a quarter of CAPACITY
CAPACITY = 4 * SLOTS


@pytest.fixture(scope="module")
def slow_server(m3_checkpoint, tmp_path_factory):
    """Sixteen input slots, and an idle replica that waits 1 s for more inputs: slots stay taken a while."""
    server = Server(
        [
            "--model", str(m3_checkpoint), "--devices", "cpu", "--dtype", "fp32",
            "--max-concurrent-requests", str(CAPACITY), "--max-client-batch-size", str(SLOTS),
            "--batch-wait-ms", "1000",
        ],
        tmp_path_factory.mktemp("logs") / "slow.log",
    )
    yield server
    server.stop()


def test_overload_answers_429_at_once_and_never_hangs(slow_server):
    async def flood():
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=60) as client:
            calls = []
            for i in range(12):
                if i % 2:
                    calls.append(client.post("/embed", json={"inputs": [f"text {i}"] * SLOTS}))
                else:
                    calls.append(client.post("/v1/embeddings", json={"input": [f"text {i}"] * SLOTS}))
            return await asyncio.gather(*calls)

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1
    for response in responses:
        if response.status_code != 429:
            continue
        body = response.json()
        if response.request.url.path == "/embed":
            assert body["error_type"] == "Overloaded"
        else:
            assert body["error"]["type"] == "rate_limit_error"
    # Slots come back once the requests are done.
    assert httpx.post(f"{slow_server.url}/embed", json={"inputs": ["a"] * SLOTS}, timeout=60).status_code == 200


def test_client_that_disconnects_frees_its_slots(slow_server):
    body = json.dumps({"inputs": ["going away"] * SLOTS}).encode()
    request = (
        f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", slow_server.port)) as sock:
        sock.sendall(request)
        # The request now holds its share of the slots, waiting out the 1 s batch window.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _inflight(slow_server) < SLOTS:
            time.sleep(0.02)
        assert _inflight(slow_server) == SLOTS
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _inflight(slow_server) > 0:
        time.sleep(0.02)
    # Freed well before its batch would have run, so a full-size request fits again.
    assert _inflight(slow_server) == 0
    assert httpx.post(f"{slow_server.url}/embed", json={"inputs": ["b"] * SLOTS}, timeout=60).status_code == 200


def _inflight(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("bgeserve_inflight_inputs "):
            return float(line.split()[1])
    raise AssertionError("bgeserve_inflight_inputs missing")


def test_sigterm_finishes_in_flight_requests(m3_checkpoint, tmp_path):
    server = Server(
        ["--model", str(m3_checkpoint), "--devices", "cpu", "--dtype", "fp32", "--batch-wait-ms", "1000", "--log-json"],
        tmp_path / "drain.log",
    )
    result: dict = {}

    def call():
        result["response"] = httpx.post(f"{server.url}/embed", json={"inputs": ["in flight"]}, timeout=60)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _inflight(server) < 1:
        time.sleep(0.02)
    status = server.stop()  # SIGTERM while the request waits in the queue
    caller.join(60)
    assert result["response"].status_code == 200
    assert len(result["response"].json()) == 1
    # uvicorn re-raises the SIGTERM after its graceful shutdown, as a signal-terminated process should.
    assert status in (0, -15)
    # --log-json: every line is a JSON object, the settings line included.
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert any(line["message"].startswith("settings:") for line in lines)
    assert any(line.get("path") == "/embed" and line.get("status") == 200 for line in lines)
    assert any(line["message"] == "Application shutdown complete." for line in lines)
