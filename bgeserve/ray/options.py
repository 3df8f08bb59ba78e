"""RayServeOptions: the arguments of the Ray Serve application builder, parsed once.

`serve run bgeserve.ray:app model=/models/bge-m3 num_replicas=4` hands the builder `key=value` strings
(a Serve config file's `args:` hands it YAML values). Keys that name a `ServeSettings` field configure
each replica's engine and app exactly as the flag of that name configures `bgeserve serve`; the keys
below configure the Ray deployment around them. No Ray import here: this is plain parsing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from bgeserve.api.settings import ENV_PREFIX, ServeSettings, SettingsError

# Requests a replica takes beyond its input slots: routes that hold no slot (/health, /info, /metrics)
# must still reach a replica whose slots are full, so that it, not the proxy, answers the 429.
ONGOING_HEADROOM = 32
# A bgeserve replica batches across requests, so it runs best with many in flight: scale out past this.
DEFAULT_TARGET_ONGOING_REQUESTS = 16.0


def _ray(help_text: str) -> dict[str, str]:
    return {"help": help_text}


@dataclass(frozen=True)
class RayServeOptions:
    """The engine settings of every replica plus the deployment's Ray options."""

    settings: ServeSettings = field(default_factory=ServeSettings)
    num_replicas: int | None = field(
        default=None, metadata=_ray("fixed replica count, or 'auto' to autoscale (default 1)")
    )
    min_replicas: int | None = field(
        default=None, metadata=_ray("autoscaling: fewest replicas (0 scales to zero); setting it turns autoscaling on")
    )
    max_replicas: int | None = field(
        default=None, metadata=_ray("autoscaling: most replicas; setting it turns autoscaling on")
    )
    target_ongoing_requests: float | None = field(
        default=None,
        metadata=_ray(f"autoscaling: requests in flight per replica to aim for "
                      f"(default {DEFAULT_TARGET_ONGOING_REQUESTS:g})"),
    )
    num_gpus_per_replica: float = field(
        default=0.0, metadata=_ray("GPUs per replica (1: one card each; 0: a CPU replica)")
    )
    num_cpus_per_replica: float | None = field(
        default=None,
        metadata=_ray("CPUs Ray reserves per replica (default: `threads` for CPU replicas, else 1); "
                      "a CPU replica runs that many torch threads unless `threads` says otherwise"),
    )
    max_ongoing_requests: int | None = field(
        default=None,
        metadata=_ray(f"requests Serve sends one replica at once (default: max_concurrent_requests + "
                      f"{ONGOING_HEADROOM}, so the replica's own slots answer 429 first)"),
    )
    max_queued_requests: int | None = field(
        default=None,
        metadata=_ray("requests each proxy may hold back when every replica is at max_ongoing_requests; past "
                      "it the proxy answers 429 (default: max_ongoing_requests)"),
    )
    deployment_name: str = field(default="bgeserve", metadata=_ray("the Serve deployment's name"))
    health_check_period_s: float = field(default=10.0, metadata=_ray("seconds between replica health checks"))
    health_check_timeout_s: float = field(
        default=30.0, metadata=_ray("seconds a health check may take before the replica is replaced")
    )

    def __post_init__(self) -> None:
        for name in ("num_replicas", "min_replicas", "max_replicas", "max_ongoing_requests", "max_queued_requests"):
            value = getattr(self, name)
            lowest = 0 if name == "min_replicas" else 1
            if value is not None and value < lowest and not (name == "max_queued_requests" and value == -1):
                raise SettingsError(f"{name} must be at least {lowest}, not {value}")
        if self.num_gpus_per_replica < 0:
            raise SettingsError(f"num_gpus_per_replica must not be negative, not {self.num_gpus_per_replica}")
        if self.num_cpus_per_replica is not None and self.num_cpus_per_replica < 0:
            raise SettingsError(f"num_cpus_per_replica must not be negative, not {self.num_cpus_per_replica}")
        if self.autoscaling and self.num_replicas is not None:
            raise SettingsError("give num_replicas, or min_replicas / max_replicas (autoscaling), not both")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise SettingsError(f"min_replicas ({low}) is above max_replicas ({high})")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise SettingsError("target_ongoing_requests must be positive")

    # -- parsing --------------------------------------------------------------------------------

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> RayServeOptions:
        """Builds the options from the builder's arguments (strings from `serve run`, YAML values from
        a config file). Unknown keys are an error that lists the known ones."""
        args = dict(args or {})
        setting_names = {f.name for f in fields(ServeSettings)}
        own = {f.name: f for f in fields(cls) if f.name != "settings"}
        unknown = sorted(set(args) - setting_names - set(own))
        if unknown:
            raise SettingsError(
                f"unknown argument(s) {', '.join(unknown)}; known: every `bgeserve serve` setting "
                f"({', '.join(sorted(setting_names))}) and {', '.join(own)}"
            )
        # Settings parse exactly as BGESERVE_* variables do: one parser for flags, env and Serve args.
        as_env = {ENV_PREFIX + k.upper(): _as_text(v) for k, v in args.items() if k in setting_names and v is not None}
        settings = ServeSettings.from_sources(None, as_env)
        values: dict[str, Any] = {"settings": settings}
        for name, f in own.items():
            if name in args and args[name] is not None:
                values[name] = _parse(name, f, args[name])
        if values.get("num_replicas") == "auto":
            del values["num_replicas"]
            values.setdefault("min_replicas", 1)
        return cls(**values)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> RayServeOptions:
        """The options from BGESERVE_<KEY> variables (the `bgeserve serve` settings and the Ray keys)."""
        names = {f.name for f in fields(ServeSettings)} | {f.name for f in fields(cls) if f.name != "settings"}
        return cls.from_args(
            {name: environ[ENV_PREFIX + name.upper()] for name in names if ENV_PREFIX + name.upper() in environ}
        )

    @classmethod
    def describe_keys(cls) -> dict[str, str]:
        """Ray-specific keys and what they do (for --help and the README)."""
        return {f.name: f.metadata["help"] for f in fields(cls) if f.name != "settings"}

    # -- what the deployment runs with ----------------------------------------------------------

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus_per_replica > 0

    @property
    def replica_threads(self) -> int | None:
        """Torch threads of a CPU replica: `threads`, else its CPU reservation (at least 1)."""
        if self.on_gpu:
            return self.settings.threads
        if self.settings.threads is not None:
            return self.settings.threads
        return max(1, int(self.num_cpus_per_replica or 1))

    def replica_settings(self) -> ServeSettings:
        """The settings one replica runs with: one device (the GPU Ray gave it, or the CPU), one model copy."""
        return dataclasses.replace(
            self.settings,
            devices="cuda:0" if self.on_gpu else "cpu",  # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU
            replicas_per_device=1,
            threads=self.replica_threads,
        )

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options` (what `serve build` writes into the config)."""
        max_ongoing = self.max_ongoing_requests or self.settings.max_concurrent_requests + ONGOING_HEADROOM
        num_cpus = self.num_cpus_per_replica
        if num_cpus is None:
            num_cpus = 1.0 if self.on_gpu else float(self.replica_threads or 1)
        options: dict[str, Any] = {
            "name": self.deployment_name,
            "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": self.num_gpus_per_replica},
            "max_ongoing_requests": max_ongoing,
            "max_queued_requests": self.max_queued_requests if self.max_queued_requests is not None else max_ongoing,
            # The proxy's own rejection (queue full) keeps the 429 contract, with a hint when to retry.
            "backpressure_config": {"status_code": 429, "retry_after_s": 1},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            # SIGTERM semantics of `bgeserve serve`: in-flight requests finish before a replica stops.
            "graceful_shutdown_timeout_s": self.settings.timeout_graceful_shutdown,
        }
        if self.autoscaling:
            low = self.min_replicas if self.min_replicas is not None else 1
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": self.max_replicas if self.max_replicas is not None else max(low, 1),
                "target_ongoing_requests": self.target_ongoing_requests or DEFAULT_TARGET_ONGOING_REQUESTS,
            }
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(name: str, f: dataclasses.Field, raw: Any) -> Any:
    if name == "num_replicas" and str(raw).strip().lower() == "auto":
        return "auto"
    kind = {"int | None": int, "float | None": float, "float": float, "str": str}[str(f.type)]
    try:
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc
