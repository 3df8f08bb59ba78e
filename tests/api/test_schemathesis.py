"""/openapi.json describes what the server does: a bounded schemathesis run, every check, against a live
server (the tiny bge-m3 behind an API key, so authentication is exercised too).

Two rules of the server cannot be written in JSON Schema, so valid (positive) cases are brought in line
with them before they are sent (negative cases go out as generated):
- token ids must be this model's tokenization: framed by its special tokens (`<s>` ... `</s>`);
- with `truncate: false` an input must fit the token limit, which depends on how the text tokenises.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.engine import Status, from_schema
from schemathesis.engine.events import FatalError, NonFatalError, ScenarioFinished

from .conftest import Server

KEY = "schemathesis-key"
CLS, SEP = 0, 2  # the tiny bge-m3's <s> and </s>
ID_FIELDS = ("input", "inputs")
# Bounds of the run: examples per operation in the fuzzing phase (about 10 s here in all), and the
# longest the whole run may take on a slow machine. (schemathesis' own `max-time` is a budget it spends
# entirely, repeating the fuzzing phase, so it is not used.)
MAX_EXAMPLES = 40
MAX_SECONDS = 90


@pytest.fixture(scope="module")
def fuzzed_server(m3_checkpoint, tmp_path_factory):
    server = Server(
        # A small OpenAI batch limit: the document says it, and boundary cases (maxItems) stay quick here.
        ["--model", str(m3_checkpoint), "--devices", "cpu", "--dtype", "fp32", "--api-key", KEY,
         "--batch-wait-ms", "0", "--max-openai-batch-size", "64"],
        tmp_path_factory.mktemp("logs") / "schemathesis.log",
    )
    yield server
    server.stop()


def _framed(value: Any) -> Any:
    """Token-id lists framed by the special tokens; anything else as it is."""
    if isinstance(value, list) and value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return [CLS, *value, SEP]
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return [_framed(v) if v else v for v in value]
    return value


def _as_the_server_requires(body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for field in ID_FIELDS:
        if field in body:
            body[field] = _framed(body[field])
    if body.get("truncate") is False:
        body["truncate"] = True
    return body


def test_the_server_answers_as_its_openapi_document_says(fuzzed_server):
    config = schemathesis.Config.from_dict({
        "seed": 13,
        "cache": {"enabled": False},  # no .schemathesis/ in the work tree, no replay of old runs
        "headers": {"Authorization": f"Bearer {KEY}"},
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": True},
        "request-timeout": 60,
    })
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json", config=config)

    @schema.hook
    def map_case(context, case):
        if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE:
            case.body = _as_the_server_requires(case.body)
        return case

    started = time.monotonic()
    failures: list[str] = []
    tested: Counter[str] = Counter()
    for event in from_schema(schema).execute():
        if isinstance(event, ScenarioFinished):
            if event.status != Status.SKIP:
                tested[event.phase.value] += 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(f"{event.label}: {check.name}: {failure.title}: {failure.message}\n"
                                        f"{check.failure_info.code_sample}")
        elif isinstance(event, NonFatalError):
            failures.append(f"{event.label}: error: {event.info.format()}")
        elif isinstance(event, FatalError):
            raise event.exception
    # Both generating phases ran on every operation.
    for phase in ("coverage", "fuzzing"):
        assert tested[phase] >= 15, tested
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert time.monotonic() - started < MAX_SECONDS
