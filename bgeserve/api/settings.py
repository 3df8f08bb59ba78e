"""ServeSettings: every knob of `bgeserve serve`, from CLI flags, then BGESERVE_* variables, then defaults.

This is the only place the service reads the environment; everything below gets the settings object.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from bgeserve.core import BackendOptions
from bgeserve.engine.engine import EngineConfig

ENV_PREFIX = "BGESERVE_"
# The service this one replaces read DEVICE; it still works (BGESERVE_DEVICES wins when both are set).
LEGACY_DEVICE_VAR = "DEVICE"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A flag or variable has a value the service cannot run with."""


def _flag(help_text: str, **argparse_kwargs: Any) -> dict[str, Any]:
    return {"help": help_text, "argparse": argparse_kwargs}


@dataclass(frozen=True)
class ServeSettings:
    """Settings of one service process. Field `x_y` is flag `--x-y` and variable `BGESERVE_X_Y`."""

    model: str | None = field(
        default=None,
        metadata=_flag("checkpoint directory or hub id (default: the bundled all-MiniLM-L6-v2)"),
    )
    served_model_name: str | None = field(
        default=None, metadata=_flag("model name reported to clients (default: the checkpoint's name)")
    )
    host: str = field(default="127.0.0.1", metadata=_flag("address to bind (0.0.0.0 for every interface)"))
    port: int = field(default=8080, metadata=_flag("TCP port"))
    api_key: str | None = field(
        default=None,
        metadata=_flag("require `Authorization: Bearer KEY` on every route except /health (an empty KEY is refused)"),
    )
    devices: str = field(
        default="auto",
        metadata=_flag("cpu, cuda:0,cuda:1,... or auto (every visible GPU, else CPU); env DEVICE also works"),
    )
    dtype: str = field(
        default="auto",
        metadata=_flag("auto (GPU: bf16 else fp16; CPU: bf16 if native and faster, else fp32), fp32, fp16, bf16, int8"),
    )
    backend: str = field(default="torch", metadata=_flag("torch or onnx (ONNX Runtime)"))
    compile: bool = field(default=False, metadata=_flag("torch.compile the model at start-up (torch backend)"))
    cuda_graphs: bool = field(
        default=False,
        metadata=_flag("replay small batches (<= 8 texts, <= 128 tokens) from CUDA graphs captured at start-up "
                       "(torch backend on CUDA; ignored on CPU)"),
    )
    query_graph: bool = field(
        default=False,
        metadata=_flag("run a lone text (a search query) through the encoder compiled into one graph "
                       "(AOTInductor; compiled once at the first start, cached beside the model; torch "
                       "backend on CPU, fp32 or bf16; int8 and CUDA run eagerly)"),
    )
    threads: int | None = field(
        default=None, metadata=_flag("CPU threads per replica (default: the cores split between replicas)")
    )
    replicas_per_device: int = field(
        default=1, metadata=_flag("model replicas on the CPU (GPUs get one each)")
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata=_flag("padded tokens per forward pass (items x longest item); default 16384 on GPUs, 2048 on CPU"),
    )
    max_batch_requests: int | None = field(
        default=None, metadata=_flag("inputs per forward pass (default: bounded by the token budget only)")
    )
    max_client_batch_size: int = field(
        default=32, metadata=_flag("inputs one request may send on the TEI and native routes (TEI's limit)")
    )
    max_openai_batch_size: int = field(
        default=2048, metadata=_flag("inputs one /v1/embeddings request may send (the OpenAI API's limit)")
    )
    max_concurrent_requests: int = field(
        default=512,
        metadata=_flag("input slots in flight across all requests; none free: HTTP 429 at once (a request "
                       "holds at most a quarter of them and streams larger batches through those)"),
    )
    payload_limit: int = field(default=2_000_000, metadata=_flag("largest request body in bytes (HTTP 413)"))
    request_timeout: float | None = field(
        default=None, metadata=_flag("seconds a request may take before HTTP 504 (default: no limit)")
    )
    read_timeout: float = field(
        default=30.0,
        metadata=_flag("seconds a client has to send a request's head (else the connection is closed), and "
                       "again its whole body (else HTTP 408)"),
    )
    timeout_keep_alive: float = field(
        default=5.0, metadata=_flag("seconds an idle keep-alive connection stays open")
    )
    limit_concurrency: int | None = field(
        default=None,
        metadata=_flag("open connections at most; past it HTTP 503 (default: the open-file limit less 128, "
                       "at most 4096)"),
    )
    timeout_graceful_shutdown: float = field(
        default=60.0,
        metadata=_flag("seconds SIGTERM waits for in-flight requests before dropping what is left"),
    )
    auto_truncate: bool = field(
        default=True,
        metadata=_flag("cut inputs longer than the model's limit when the request does not say"),
    )
    batch_wait_ms: float = field(
        default=2.0, metadata=_flag("how long an idle replica waits for more inputs before running a batch")
    )
    tokenization_workers: int = field(default=2, metadata=_flag("threads that tokenise requests"))
    log_json: bool = field(default=False, metadata=_flag("log one JSON object per line"))
    log_level: str = field(default="info", metadata=_flag("debug, info, warning or error"))

    def __post_init__(self) -> None:
        positive = (
            "max_client_batch_size",
            "max_openai_batch_size",
            "max_concurrent_requests",
            "payload_limit",
            "replicas_per_device",
            "tokenization_workers",
        )
        if self.api_key is not None and not self.api_key.strip():
            # `--api-key "$KEY"` with KEY unset must not quietly serve without authentication.
            raise SettingsError("--api-key (or BGESERVE_API_KEY) is set but empty: give a key, or leave it out "
                                "to serve without authentication")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"--{_dash(name)} must be at least 1, not {getattr(self, name)}")
        for name in ("read_timeout", "timeout_keep_alive", "timeout_graceful_shutdown"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"--{_dash(name)} must be positive, not {getattr(self, name)}")
        for name in ("threads", "max_batch_tokens", "max_batch_requests", "limit_concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingsError(f"--{_dash(name)} must be at least 1, not {value}")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"--port must be between 0 and 65535, not {self.port}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise SettingsError("--request-timeout must be positive (leave it out for no limit)")
        if self.batch_wait_ms < 0:
            raise SettingsError("--batch-wait-ms must not be negative")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"--log-level must be debug, info, warning or error, not {self.log_level!r}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds one flag per field; flags left out fall back to the environment, then the default."""
        for f in fields(cls):
            kind = _base_type(f)
            shown = "on" if f.default is True else "off" if f.default is False else f.default
            help_text = f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}; default {shown}]"
            if kind is bool:
                parser.add_argument(
                    f"--{_dash(f.name)}", action=argparse.BooleanOptionalAction, default=None, help=help_text
                )
            else:
                parser.add_argument(
                    f"--{_dash(f.name)}", type=kind, default=None, metavar=f.name.upper(), help=help_text
                )

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> ServeSettings:
        """Flag if given, else BGESERVE_<NAME> (and DEVICE for devices), else the default."""
        environ = environ or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            given = getattr(args, f.name, None) if args is not None else None
            if given is not None:
                values[f.name] = given
                continue
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None and f.name == "devices":
                raw = environ.get(LEGACY_DEVICE_VAR)
            if raw is not None:
                values[f.name] = _parse_env(f, raw)
        return cls(**values)

    def backend_options(self) -> BackendOptions:
        """How every replica runs (the part of the settings the backends need)."""
        return BackendOptions(
            backend=self.backend, dtype=self.dtype, threads=self.threads, compile=self.compile,
            cuda_graphs=self.cuda_graphs, query_graph=self.query_graph,
        )

    def engine_config(self) -> EngineConfig:
        """The part of the settings the engine needs."""
        return EngineConfig(
            max_batch_tokens=self.max_batch_tokens,
            max_batch_requests=self.max_batch_requests,
            max_concurrent_inputs=self.max_concurrent_requests,
            batch_wait_ms=self.batch_wait_ms,
            request_timeout=self.request_timeout,
            auto_truncate=self.auto_truncate,
            tokenization_workers=self.tokenization_workers,
        )

    def connection_limit(self, open_files: int) -> int:
        """--limit-concurrency, or what the open-file limit leaves room for (fds for files, logs and
        the listening socket kept aside), so accept() never fails for want of a descriptor."""
        if self.limit_concurrency is not None:
            return self.limit_concurrency
        return max(16, min(4096, open_files - 128))

    def describe(self, resolved: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The settings as printed at start-up (the API key masked), with `resolved` values for defaults
        that depend on the model and devices (the checkpoint path, the token budget, ...)."""
        shown = {**dataclasses.asdict(self), **(resolved or {})}
        if self.api_key:
            shown["api_key"] = "***"
        return shown


def _dash(name: str) -> str:
    return name.replace("_", "-")


def _base_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(ServeSettings)
    kind = hints[f.name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def _parse_env(f: dataclasses.Field, raw: str) -> Any:
    kind = _base_type(f)
    variable = ENV_PREFIX + f.name.upper()
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingsError(f"{variable}={raw!r} is not a boolean (use true or false)")
    if kind is str:
        # An empty variable means "not set" for optional text (BGESERVE_MODEL=), but an empty API key is
        # a mistake to report, never "no authentication".
        return (raw or None) if f.default is None and f.name != "api_key" else raw
    try:
        return kind(raw)
    except ValueError as exc:
        raise SettingsError(f"{variable}={raw!r} is not a valid {kind.__name__}") from exc
