"""/docs (Swagger UI) and /redoc (ReDoc) render in a real headless chromium that can reach only loopback."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from .conftest import API_KEY, Server, free_port

PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
ENSURE_CHROMIUM = Path(__file__).resolve().parents[2] / "scripts" / "ensure_chromium.sh"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's chromium, installed first where missing; skips only where nothing can install it."""
    done = subprocess.run(["bash", str(ENSURE_CHROMIUM)], capture_output=True, text=True, timeout=900)
    if done.returncode == 3:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, f"installing chromium failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    path = shutil.which("chromium")
    assert path, "chromium is still not on PATH after the install"
    return path


def render(chromium: str, url: str, profile: Path) -> str:
    """The DOM of `url` after its scripts ran, with every request to a host other than loopback failing."""
    dead_proxy = f"127.0.0.1:{free_port()}"  # nothing listens there: any proxied request is refused
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        f"--user-data-dir={profile}",
        # Names resolve to nothing, and every non-loopback address (IP literals too) goes to a dead proxy.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--proxy-server={dead_proxy}",
        "--virtual-time-budget=15000",
        "--dump-dom", url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def schema_operations(server: Server) -> set[tuple[str, str]]:
    paths = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    return {(method, path) for path, item in paths.items() for method in item}


def test_pages_and_assets_are_open_local_and_outside_the_schema(minilm_server):
    url = minilm_server.url
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401  # the key still guards the API
    for page in PAGES:
        response = httpx.get(f"{url}{page}", timeout=10)
        assert response.status_code == 200, page
        external = [u for u in re.findall(r"https?://[^\s\"'<>]+", response.text) if not u.startswith(url)]
        assert external == [], f"{page} loads from outside the server: {external}"
        for asset in re.findall(r'(?:src|href)="(/[^"]+)"', response.text):
            loaded = httpx.get(f"{url}{asset}", timeout=10)
            assert loaded.status_code == 200 and loaded.content, asset
    schema_paths = {path for _, path in schema_operations(minilm_server)}
    assert not {p for p in schema_paths if p.startswith(("/docs", "/redoc"))}
    assert {"/v1/embeddings", "/embed", "/encode"} <= schema_paths


def test_docs_assets_add_no_metric_labels(minilm_server):
    url = minilm_server.url
    for asset in ("swagger-ui.css", "favicon.png", "no-such-file.js"):
        httpx.get(f"{url}/docs-assets/{asset}", timeout=10)
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
    routes = set(re.findall(r'route="([^"]+)"', text))
    assert "other" in routes
    assert not {r for r in routes if "docs" in r or "redoc" in r}


def test_swagger_ui_renders_every_route_offline(minilm_server, chromium, tmp_path):
    dom = render(chromium, f"{minilm_server.url}/docs", tmp_path / "profile")
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert {"/v1/embeddings", "/embed", "/encode"} <= rendered
    assert rendered == {path for _, path in schema_operations(minilm_server)}


def test_redoc_renders_every_operation_offline(minilm_server, chromium, tmp_path):
    dom = render(chromium, f"{minilm_server.url}/redoc", tmp_path / "profile")
    # ReDoc writes each operation as a verb badge followed by its path.
    rendered = set(re.findall(r'http-verb (\w+)">\w+</span><span[^>]*>(/[^<]*)</span>', dom))
    assert {("post", "/v1/embeddings"), ("post", "/embed"), ("post", "/encode")} <= rendered
    assert rendered == schema_operations(minilm_server)
