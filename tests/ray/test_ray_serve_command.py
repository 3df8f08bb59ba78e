"""`bgeserve serve --ray`: the flags the serve command gets, a local Ray started for it, SIGTERM stops all."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import httpx
from deadlines import wait_for

from tests.api.conftest import free_port

# What `bgeserve serve` runs once `--ray` is wired into bgeserve/cli/serve.py (see the README).
SERVE = textwrap.dedent("""
    import argparse, os, sys
    from bgeserve.cli import serve as command
    from bgeserve.api.logs import configure_logging
    from bgeserve.api.settings import ServeSettings
    from bgeserve.ray.commands import add_serve_arguments, serve_on_ray

    sub = argparse.ArgumentParser(prog="bgeserve").add_subparsers()
    command.register(sub)
    parser = sub.choices["serve"]
    if "--ray" not in parser._option_string_actions:
        add_serve_arguments(parser)
    args = parser.parse_args(sys.argv[1:])
    settings = ServeSettings.from_sources(args, os.environ)
    configure_logging(settings.log_json, settings.log_level)
    sys.exit(serve_on_ray(settings, args))
""")


def test_serve_ray_flag_serves_and_stops_on_sigterm(m3_checkpoint, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "--ray", "--model", str(m3_checkpoint), "--dtype", "fp32", "--port", str(port),
         "--api-key", "k", "--ray-arg", "num_cpus_per_replica=1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 90, "bgeserve serve --ray to answer /health", every=0.5)
        answer = httpx.post(f"{url}/v1/embeddings", json={"input": "x", "model": "m"},
                            headers={"Authorization": "Bearer k"}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 32
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=30).status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output
    assert f"serving on http://127.0.0.1:{port} through Ray Serve" in output
