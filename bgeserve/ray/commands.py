"""`bgeserve serve --ray` and `bgeserve encode --ray`: the flags and what they run.

Importing this module does not import Ray, so `bgeserve --help` works without the `ray` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bgeserve.api.settings import ServeSettings


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --ray, --ray-address and --ray-arg to `bgeserve serve`."""
    group = parser.add_argument_group("Ray Serve (pip install 'bgeserve[ray]')")
    group.add_argument(
        "--ray", action="store_true",
        help="serve through Ray Serve: one replica process per device, Serve's proxy on --host:--port",
    )
    group.add_argument(
        "--ray-address", metavar="ADDR",
        help="Ray cluster to deploy on (e.g. ray://head:10001 or auto; default: start a local Ray)",
    )
    group.add_argument(
        "--ray-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a key of `serve run bgeserve.ray:app`, e.g. num_replicas=4, num_gpus_per_replica=1, "
        "min_replicas=1 max_replicas=8 (repeatable)",
    )


def parse_key_values(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE strings (as `serve run` takes them) into a dict."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--ray-arg takes KEY=VALUE, not {pair!r}")
        values[key.strip()] = value
    return values


def serve_on_ray(settings: ServeSettings, args: argparse.Namespace) -> int:
    """Runs `bgeserve serve --ray` with the settings already built from flags and environment."""
    from bgeserve.api.settings import SettingsError

    try:
        ray_args = parse_key_values(args.ray_arg)
        from bgeserve.ray.options import RayServeOptions

        RayServeOptions.from_args(ray_args)  # report a bad key before starting anything
    except (ValueError, SettingsError) as exc:
        print(f"bgeserve serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        from bgeserve.ray.serve_app import run_serve
    except ImportError as exc:
        print(f"bgeserve serve: error: --ray needs the ray extra (pip install 'bgeserve[ray]'): {exc}",
              file=sys.stderr)
        return 2
    return run_serve(settings, args.ray_address, ray_args)


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the Ray Data flags to `bgeserve encode` (--input becomes a glob, --output a directory)."""
    group = parser.add_argument_group(
        "Ray Data corpus job (pip install 'bgeserve[ray]'): --input GLOB of JSON lines / Parquet files, "
        "--output DIR gets one Parquet file per input; a rerun skips complete outputs"
    )
    group.add_argument("--ray", action="store_true", help="embed the files with a Ray Data job")
    group.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to run on (default: a local Ray)")
    group.add_argument("--text-column", default="text", help="column (or JSON field) with the text (default text)")
    group.add_argument("--id-column", default="id",
                       help="column kept as the output's id (default id; missing: the row number)")
    group.add_argument("--concurrency", default="1", metavar="N|MIN,MAX",
                       help="embedding actors: N, or MIN,MAX to autoscale (default 1)")
    group.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (default 0: CPU actors)")
    group.add_argument("--num-cpus", type=float, default=None,
                       help="CPUs Ray reserves per actor (default --threads, else 1); a CPU actor runs "
                       "--threads torch threads (default: this many)")
    group.add_argument("--tokenize-num-cpus", type=float, default=1.0, help="CPUs per tokenisation task (default 1)")


def parse_concurrency(text: str) -> int | tuple[int, int]:
    """'4' -> 4, '2,8' -> (2, 8)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--concurrency takes N or MIN,MAX, not {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"--concurrency takes N or MIN,MAX, not {text!r}")


def corpus_job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `run_corpus_job` keywords the `bgeserve encode` flags ask for."""
    if args.input == "-" or args.output == "-":
        raise ValueError("--ray reads files and writes a directory: give --input GLOB and --output DIR")
    threads = int(args.threads) if args.threads else None
    num_cpus = args.num_cpus if args.num_cpus is not None else float(threads or 1)
    return {
        "model": args.model,
        "text_column": args.text_column,
        "id_column": args.id_column or None,
        "dense": not args.no_dense,
        "sparse": args.sparse,
        "colbert": args.colbert,
        "max_length": args.max_length,
        "dtype": args.dtype,
        "concurrency": parse_concurrency(args.concurrency),
        "num_gpus": args.num_gpus,
        "num_cpus": num_cpus,
        "threads": threads,
        "tokenize_num_cpus": args.tokenize_num_cpus,
        "batch_size": args.batch_size,
        "max_batch_tokens": args.max_batch_tokens,
        "progress": not args.no_progress,
    }


def ray_init_arguments(address: str | None) -> dict[str, Any]:
    """`ray.init` keywords: the cluster at `address` (or RAY_ADDRESS; `auto` finds the one `ray start`
    started here), else a new local Ray without dashboard (never a stray cluster found on the machine)."""
    if address or os.environ.get("RAY_ADDRESS"):
        return {"address": address}
    return {"address": "local", "include_dashboard": False}


def encode_on_ray(args: argparse.Namespace) -> int:
    """Runs `bgeserve encode --ray`; prints the summary; 0, or 1 with a one-line message."""
    from bgeserve.errors import BgeServeError

    try:
        options = corpus_job_options(args)
        import ray

        from bgeserve.ray.corpus_job import run_corpus_job

        if not ray.is_initialized():
            ray.init(**ray_init_arguments(args.ray_address))
        summary = run_corpus_job(args.input, args.output, **options)
    except ImportError as exc:
        print(f"bgeserve encode: error: --ray needs the ray extra (pip install 'bgeserve[ray]'): {exc}",
              file=sys.stderr)
        return 2
    except (BgeServeError, ValueError, OSError) as exc:
        print(f"bgeserve encode: error: {exc}", file=sys.stderr)
        return 1
    print(f"bgeserve encode --ray: {summary}", file=sys.stderr)
    return 0
