"""ServeSettings: flags over BGESERVE_* variables over defaults; DEVICE still works; bad values refused."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bgeserve.api.settings import ServeSettings, SettingsError


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeSettings:
    parser = argparse.ArgumentParser()
    ServeSettings.add_arguments(parser)
    return ServeSettings.from_sources(parser.parse_args(argv), env or {})


def test_defaults_are_safe():
    settings = parse([])
    assert settings.host == "127.0.0.1" and settings.port == 8080
    assert settings.model is None and settings.api_key is None
    # No budget set: the engine picks one for its devices (see tests/engine).
    assert settings.max_batch_tokens is None and settings.max_client_batch_size == 32
    assert settings.max_openai_batch_size == 2048
    assert parse(["--max-batch-tokens", "4096"]).max_batch_tokens == 4096
    assert settings.max_concurrent_requests == 512 and settings.payload_limit == 2_000_000
    assert settings.auto_truncate is True and settings.devices == "auto"


def test_flags_win_over_environment_and_device_is_honoured():
    env = {"BGESERVE_PORT": "9000", "BGESERVE_AUTO_TRUNCATE": "false", "DEVICE": "cpu", "BGESERVE_API_KEY": "k"}
    settings = parse(["--port", "9100"], env)
    assert settings.port == 9100
    assert settings.auto_truncate is False
    assert settings.devices == "cpu"
    assert settings.describe()["api_key"] == "***"
    assert parse([], {"DEVICE": "cpu", "BGESERVE_DEVICES": "cuda:0,cuda:1"}).devices == "cuda:0,cuda:1"
    assert parse(["--no-auto-truncate"]).auto_truncate is False


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--max-batch-tokens", "0"], {}, "max-batch-tokens"),
        (["--max-openai-batch-size", "0"], {}, "max-openai-batch-size"),
        (["--port", "70000"], {}, "port"),
        ([], {"BGESERVE_PORT": "eighty"}, "BGESERVE_PORT"),
        ([], {"BGESERVE_LOG_JSON": "perhaps"}, "boolean"),
        (["--request-timeout", "0"], {}, "request-timeout"),
        (["--read-timeout", "0"], {}, "read-timeout"),
        (["--timeout-graceful-shutdown", "-1"], {}, "timeout-graceful-shutdown"),
        (["--limit-concurrency", "0"], {}, "limit-concurrency"),
        (["--api-key", ""], {}, "empty"),
        ([], {"BGESERVE_API_KEY": ""}, "empty"),
    ],
)
def test_bad_values_are_refused(argv, env, words):
    with pytest.raises(SettingsError, match=words):
        parse(argv, env)


def test_connection_defaults_are_bounded():
    settings = parse([])
    assert settings.read_timeout == 30 and settings.timeout_keep_alive == 5
    assert settings.timeout_graceful_shutdown == 60  # SIGTERM always ends
    # The connection cap leaves descriptors for the process itself; an explicit value wins.
    assert settings.connection_limit(1024) == 896 and settings.connection_limit(1_000_000) == 4096
    assert parse(["--limit-concurrency", "10"]).connection_limit(1024) == 10
    # An empty optional text variable still means "not set" where that is harmless.
    assert parse([], {"BGESERVE_MODEL": ""}).model is None


def test_cli_reports_bad_settings_and_missing_model_without_traceback(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "bgeserve", "serve", "--max-batch-tokens", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "max-batch-tokens" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "bgeserve", "serve", "--model", str(tmp_path / "nope"), "--devices", "cpu"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_start_up_line_shows_the_values_the_server_runs_with(minilm_server):
    line = next(line for line in minilm_server.log().splitlines() if "settings: " in line)
    shown = json.loads(line.split("settings: ", 1)[1])
    # No --model and no --max-batch-tokens: the bundled model's directory and the CPU budget, not null.
    assert (Path(shown["model"]) / "tokenizer.json").is_file()
    assert shown["max_batch_tokens"] == 2048
    assert shown["served_model_name"] == "minilm" and shown["devices"] == "cpu" and shown["dtype"] == "fp32"
    assert shown["api_key"] == "***"
