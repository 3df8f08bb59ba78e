"""bgeserve on Ray (the `ray` extra): a Ray Serve application and a Ray Data corpus job.

- `app`: the Serve application builder, `serve run bgeserve.ray:app model=/models/bge-m3 num_replicas=4`
  (and `import_path: bgeserve.ray:app` with `args:` in a Serve config file).
- `app_from_env`: the same application configured by BGESERVE_* variables, for
  `serve build bgeserve.ray:app_from_env -o serve.yaml` (`serve build` takes a built app, not a builder).
- `run_corpus_job`: embed JSONL / Parquet files into Parquet with an actor pool of models.

Nothing imports Ray until one of these is used, so `bgeserve` runs without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "app_from_env", "run_corpus_job", "run_serve"]


def __getattr__(name: str) -> Any:
    if name in ("app", "run_serve"):
        from bgeserve.ray import serve_app

        return getattr(serve_app, name)
    if name == "app_from_env":
        import os

        from bgeserve.ray.options import RayServeOptions
        from bgeserve.ray.serve_app import build_application

        # The entry point `serve build` / `serve deploy` import: the environment is its only input.
        return build_application(RayServeOptions.from_environ(os.environ))
    if name == "run_corpus_job":
        from bgeserve.ray.corpus_job import run_corpus_job

        return run_corpus_job
    raise AttributeError(f"module 'bgeserve.ray' has no attribute {name!r}")
