"""HTTP mode against a small real server on 127.0.0.1: counts, errors by status, percentiles, outputs."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from fastapi import FastAPI, Request  # module level: FastAPI resolves the string annotations here
from fastapi.responses import JSONResponse

from bgeserve.bench.http_load import LoadSettings, resolve_target, run_load
from bgeserve.cli import main


def _app():
    """OpenAI- and TEI-shaped endpoints; every 4th OpenAI request is refused with 429."""
    app = FastAPI()
    app.state.calls = 0
    app.state.bodies = []

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        app.state.calls += 1
        if app.state.calls % 4 == 0:
            return JSONResponse({"error": {"message": "busy", "type": "overloaded"}}, status_code=429)
        texts = body["input"]
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.6, 0.8]} for i in range(len(texts))],
            "model": body.get("model"),
            "usage": {"prompt_tokens": 5 * len(texts), "total_tokens": 5 * len(texts)},
        }

    @app.post("/embed")
    async def embed(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        return JSONResponse([[0.6, 0.8] for _ in body["inputs"]], headers={"x-compute-tokens": "7"})

    return app


@pytest.fixture(scope="module")
def server():
    import uvicorn

    app = _app()
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_levels_count_requests_errors_and_tokens(server, corpus_file, tmp_path, capsys):
    app, url = server
    out_json, out_png = tmp_path / "http.json", tmp_path / "http.png"
    code = main(["bench", "--url", url, "--corpus", str(corpus_file), "--concurrency", "1,4",
                 "--requests", "12", "--batch", "3", "--model-name", "m3", "--json", str(out_json),
                 "--plot", str(out_png)])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    assert doc["mode"] == "http" and doc["wire"] == "openai" and doc["url"] == url + "/v1/embeddings"
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4]
    for level in doc["levels"]:
        assert level["requests"] == 12  # the budget, exactly: loops are bounded
        assert level["ok"] + sum(level["errors"].values()) == 12
        assert set(level["errors"]) <= {"429"} and level["ok"] >= 8
        assert level["latency_ms"]["n"] == level["ok"]
        assert level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
        # texts/s and tokens/s from the answers that succeeded (5 tokens per text in this server)
        assert level["tokens_per_s"] == pytest.approx(5 * level["texts_per_s"])
    assert all(b["model"] == "m3" and len(b["input"]) == 3 for b in app.state.bodies[-12:])
    assert "| 4 | 12 |" in out and "429: " in out
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_duration_bounds_a_level_and_tei_format(server, corpus_file):
    app, url = server
    target = resolve_target(url + "/embed")
    settings = LoadSettings(concurrency=(2,), duration_s=0.5, batch=2, warmup_requests=1)
    started = time.perf_counter()
    (level,) = asyncio.run(run_load(target, ["a", "b", "c"], settings))
    assert time.perf_counter() - started < 10
    assert level.requests > 0 and level.ok == level.requests and not level.errors
    assert level.tokens == 7 * level.ok  # from the x-compute-tokens header
    assert all(b["inputs"] and len(b["inputs"]) == 2 for b in app.state.bodies[-level.requests:])


def test_target_resolution():
    assert resolve_target("http://h:1").url == "http://h:1/v1/embeddings"
    assert resolve_target("http://h:1/v1/embeddings").wire == "openai"
    assert resolve_target("http://h:1/embed").wire == "tei"
    for bad in ("ftp://h/x", "h:8080", "http://h:1/health"):
        with pytest.raises(ValueError):
            resolve_target(bad)


def test_unreachable_server_is_a_clear_error(corpus_file, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the bench runs: nothing listens there
    code = main(["bench", "--url", f"http://127.0.0.1:{port}", "--corpus", str(corpus_file),
                 "--requests", "2", "--concurrency", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach" in err and "Traceback" not in err


def test_http_mode_argument_errors(corpus_file, capsys):
    code = main(["bench", "--url", "http://127.0.0.1:9/x", "--corpus", str(corpus_file)])
    assert code == 2 and "neither" in capsys.readouterr().err
    code = main(["bench", "--url", "http://127.0.0.1:9", "--model", "x", "--corpus", str(corpus_file)])
    assert code == 2 and "--url" in capsys.readouterr().err
    for levels in ("0", "a,b", "4,x"):
        code = main(["bench", "--url", "http://127.0.0.1:9", "--concurrency", levels, "--corpus", str(corpus_file)])
        assert code == 2 and "--concurrency needs positive integers" in capsys.readouterr().err


def test_against_a_real_bgeserve_server(tiny_m3, corpus_file, tmp_path, capsys):
    """The load generator against `bgeserve serve` itself (tiny checkpoint, loopback)."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stderr_file = tmp_path / "serve.stderr"
    with stderr_file.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bgeserve", "serve", "--model", str(tiny_m3), "--devices", "cpu", "--dtype", "fp32",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "BGESERVE_THREADS": "1"},
        )
    try:
        # A server that does not come up is a failure of `bgeserve serve`, never a reason to skip.
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bgeserve serve exited with {proc.returncode}; its stderr:\n{stderr_file.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bgeserve serve not healthy after 120 s; its stderr:\n{stderr_file.read_text()}")
            time.sleep(0.2)
        out_json = tmp_path / "real.json"
        code = main(["bench", "--url", f"http://127.0.0.1:{port}", "--corpus", str(corpus_file),
                     "--concurrency", "1,3", "--requests", "6", "--batch", "2", "--json", str(out_json)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        levels = json.loads(out_json.read_text(encoding="utf-8"))["levels"]
        for level in levels:
            assert level["requests"] == level["ok"] == 6 and level["errors"] == {}
            assert level["tokens_per_s"] and level["tokens_per_s"] > level["texts_per_s"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
