"""`bgeserve bench`: the comparison table (in-process configs and peers) or an HTTP load run."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bgeserve.bench.configs import DEFAULT_CONFIGS

EPILOG = """\
examples:
  bgeserve bench --model DIR --corpus texts.txt --configs cpu-fp32-t1,cpu-fp32,cpu-int8 \\
      --baseline cpu-fp32-t1 --json out.json --plot out.png
  bgeserve bench --synthetic full --limit 48 --compare flagembedding,transformers,onnxruntime
  bgeserve bench --url http://127.0.0.1:8080 --corpus texts.txt --concurrency 1,8,64 --duration 30

A config is KIND-DTYPE[-tN]: cpu-fp32, cpu-bf16, cpu-int8, cuda-fp16, cuda-bf16, onnx-fp32, onnx-int8;
-tN runs on N threads. Configs this machine cannot run are listed as skipped, with the reason.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `bgeserve bench`."""
    p = sub.add_parser(
        "bench",
        help="measure throughput, latency, memory and fidelity per configuration, or load-test a server",
        description="Measure bgeserve configurations and peers on the same texts, or load-test a running "
        "server (--url). Prints a markdown table; --json and --plot save the rest.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model (offline mode)")
    which = src.add_mutually_exclusive_group()
    which.add_argument("--model", help="checkpoint directory or hub id (default: the bundled MiniLM)")
    which.add_argument("--synthetic", choices=["tiny", "full"],
                       help="generate (once, cached) a random bge-m3 of this size and measure it")
    src.add_argument("--cache-dir", type=Path, help="cache for --synthetic and ONNX exports "
                     "(default: $XDG_CACHE_HOME/bgeserve or ~/.cache/bgeserve)")
    p.add_argument("--corpus", type=Path, help="UTF-8 text file, one text per line "
                   "(default: the bundled multilingual sample bgeserve/data/mixed.txt)")
    p.add_argument("--limit", type=int, help="use N texts spread evenly over the corpus")
    off = p.add_argument_group("offline mode")
    off.add_argument("--configs", default=DEFAULT_CONFIGS,
                     help="comma list of KIND-DTYPE[-compiled][-graphs|-qgraph][-tN]: "
                     "-compiled runs a torch row under torch.compile, -graphs a cuda row with CUDA graphs, "
                     "-qgraph a cpu-fp32/bf16 row with --query-graph, -tN on N threads "
                     f"(default: {DEFAULT_CONFIGS})")
    off.add_argument("--baseline", help="config the speed-up column divides by "
                     "(default: cpu-fp32-t1 when listed, else the first that ran)")
    off.add_argument("--compare", default="", help="peers on the same texts: flagembedding, transformers, "
                     "onnxruntime, bgelite (bge-m3-lite), openvino (optimum-intel) (each in every precision it "
                     "offers) or single rows (transformers-int8)")
    off.add_argument("--openvino-python", type=Path, help="interpreter with optimum-intel that runs the openvino "
                     "rows, always in a process of their own (default: .venv-openvino/bin/python, made by "
                     "scripts/openvino_venv.sh, when it exists)")
    off.add_argument("--outputs", choices=["dense", "all"], default="dense",
                     help="all = dense + sparse + ColBERT (default: dense)")
    off.add_argument("--max-length", type=int, default=512, help="truncate texts to this many tokens (512)")
    off.add_argument("--batch-size", type=int, default=32, help="encode batch size, ours and peers' (32)")
    off.add_argument("--flag-batch-size", type=int, help="FlagEmbedding's batch size (default: --batch-size)")
    off.add_argument("--query", help="the single short query timed for latency "
                     "(default: the corpus text closest to 12 tokens)")
    off.add_argument("--repeats", type=int, default=3, help="timed passes over the corpus; median kept (3)")
    off.add_argument("--query-runs", type=int, default=10, help="timed single-query calls (10)")
    off.add_argument("--batch-runs", type=int, default=3, help="timed batch calls (3)")
    off.add_argument("--rounds", type=int, default=1, help="run every row this many times, in alternating "
                     "order (with --interleave: every phase, the rows loaded once), for figures that hold on a "
                     "machine whose speed drifts: texts/s is the median of the rounds, a speed-up the median of "
                     "same-round ratios (1)")
    off.add_argument("--ratios", default="", help="comma list of A/B pairs of rows (e.g. "
                     "onnx-int8/cpu-bf16,cpu-bf16/openvino-bf16): a table of how many times faster A is than B, "
                     "in texts/s and short query, each ratio taken within a round")
    off.add_argument("--interleave", action="store_true",
                     help="load every row once, all at the same time (each in its own process), and run each "
                     "phase of a round (the query calls, the batch calls, each corpus pass, the product rate) row "
                     "by row, so that rows are compared seconds apart on a machine whose speed drifts; every "
                     "row's memory must fit at once")
    off.add_argument("--inline", action="store_true",
                     help="run every row in this process instead of a fresh process per row "
                     "(faster start; the memory column is then less exact)")
    off.add_argument("--allow-emulated-bf16", action="store_true",
                     help="measure bf16 rows even on CPUs without native bf16")
    http = p.add_argument_group("HTTP mode")
    http.add_argument("--url", help="server base URL (then its /v1/embeddings is used), "
                      "or a full /v1/embeddings or /embed URL")
    http.add_argument("--concurrency", default="1,8,64", help="comma list of concurrent clients (1,8,64)")
    http.add_argument("--duration", type=float, help="seconds per concurrency level (default 30 "
                      "unless --requests is given)")
    http.add_argument("--requests", type=int, help="requests per concurrency level")
    http.add_argument("--model-name", default="bgeserve", help="`model` field of OpenAI requests")
    p.add_argument("--batch", type=int, help="texts per latency batch (offline, default 32) "
                   "or per request (HTTP, default 1)")
    p.add_argument("--timeout", type=float, help="seconds per row and round (offline, default none; with "
                   "--interleave per exchange with a row: its load, each phase, its end) "
                   "or per request (HTTP, default 60)")
    p.add_argument("--json", type=Path, help="write the full results as JSON here")
    p.add_argument("--plot", type=Path, help="draw throughput and latency into this PNG (needs matplotlib)")
    p.set_defaults(func=run)


class UsageError(Exception):
    """Bad arguments: reported in one line, exit status 2."""


def run(args: argparse.Namespace) -> int:
    """Entry point of `bgeserve bench`: checks arguments, then runs the chosen mode."""
    from bgeserve.errors import InvalidCheckpoint, ModelNotFound

    try:
        _check_common(args)
        if args.url:
            return _run_http(args)
        return _run_offline(args)
    except UsageError as exc:
        print(f"bgeserve bench: error: {exc}", file=sys.stderr)
        return 2
    except (ModelNotFound, InvalidCheckpoint, ConnectionError, OSError) as exc:
        print(f"bgeserve bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bgeserve bench: interrupted", file=sys.stderr)
        return 130


def _check_common(args: argparse.Namespace) -> None:
    positive = {"--limit": args.limit, "--batch": args.batch, "--requests": args.requests,
                "--batch-size": args.batch_size, "--flag-batch-size": args.flag_batch_size,
                "--max-length": args.max_length, "--repeats": args.repeats, "--rounds": args.rounds}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    for flag, value in {"--query-runs": args.query_runs, "--batch-runs": args.batch_runs}.items():
        if value < 0:
            raise UsageError(f"{flag} must not be negative")
    for flag, value in {"--duration": args.duration, "--timeout": args.timeout}.items():
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, not {value}")
    if args.interleave and args.inline:
        raise UsageError("--interleave keeps every row in a process of its own: it does not go with --inline")
    if args.url and (args.model or args.synthetic):
        raise UsageError("--url load-tests a running server; --model/--synthetic are for the offline mode")
    if args.plot and args.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG: give a path ending in .png, not {args.plot}")


def _read_corpus(path: Path | None) -> tuple[str, list[str]]:
    if path is None:
        from importlib import resources

        text = resources.files("bgeserve").joinpath("data", "mixed.txt").read_text(encoding="utf-8")
        return "bgeserve/data/mixed.txt (bundled)", text.splitlines()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UsageError(f"corpus file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"corpus file {path} is not UTF-8 text: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"corpus file {path} has no non-empty lines")
    return str(path), lines


def _command_line() -> str:
    return "bgeserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "bgeserve bench"


def _write_outputs(args: argparse.Namespace, document: dict, draw) -> None:
    from bgeserve.bench.model_source import stderr_log
    from bgeserve.bench.report import PlotUnavailable

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        stderr_log(f"wrote {args.json}")
    if args.plot:
        try:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            draw(args.plot)
            stderr_log(f"wrote {args.plot}")
        except PlotUnavailable as exc:
            stderr_log(f"bgeserve bench: no plot: {exc}")


# --- offline ---------------------------------------------------------------------------------------

def _run_offline(args: argparse.Namespace) -> int:
    import torch

    from bgeserve.bench import report as rep
    from bgeserve.bench.configs import (
        default_openvino_python,
        parse_compare,
        parse_config,
        parse_config_list,
        parse_pairs,
        probe_machine,
    )
    from bgeserve.bench.flops import projection_flops_per_token
    from bgeserve.bench.measure import MeasureOptions
    from bgeserve.bench.model_source import default_cache_dir, stderr_log, synthetic_checkpoint
    from bgeserve.bench.offline import OfflinePlan, build_corpus, run_offline
    from bgeserve.bench.runners import RunSettings
    from bgeserve.models.checkpoint import load_checkpoint

    for flag in ("concurrency", "requests", "duration"):
        if flag != "concurrency" and getattr(args, flag) is not None:
            raise UsageError(f"--{flag} belongs to the HTTP mode (--url)")
    try:
        configs = parse_config_list(args.configs) + parse_compare(args.compare)
        baseline = parse_config(args.baseline) if args.baseline else None
        pairs = parse_pairs(args.ratios)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    configs = list(dict.fromkeys(configs))
    for pair in pairs:
        for config in pair:
            if config not in configs:
                raise UsageError(f"--ratios {config.name} is not among the configs: "
                                 f"{', '.join(c.name for c in configs)}")
    if baseline is None:
        default = parse_config("cpu-fp32-t1")
        baseline = default if default in configs else None
    elif baseline not in configs:
        raise UsageError(f"--baseline {baseline.name} is not among the configs: "
                         f"{', '.join(c.name for c in configs)}")

    cache_dir = args.cache_dir or default_cache_dir()
    openvino_python = str(args.openvino_python) if args.openvino_python else default_openvino_python()
    model = args.model
    if args.synthetic:
        model = str(synthetic_checkpoint(args.synthetic, cache_dir, log=stderr_log))
    source, lines = _read_corpus(args.corpus)
    checkpoint = load_checkpoint(model)
    max_length = min(args.max_length, checkpoint.max_length)

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in checkpoint.tokenizer.encode(texts, max_length=max_length).ids]

    corpus = build_corpus(source, lines, count_tokens, args.limit, args.batch or 32, args.query)
    settings = RunSettings(
        model_path=str(checkpoint.path),
        max_length=max_length,
        batch_size=args.batch_size,
        flag_batch_size=args.flag_batch_size or args.batch_size,
        outputs=args.outputs,
        default_threads=torch.get_num_threads(),
        cache_dir=str(cache_dir),
        openvino_python=openvino_python,
    )
    options = MeasureOptions(repeats=args.repeats, query_runs=args.query_runs, batch_runs=args.batch_runs)
    plan = OfflinePlan(configs, settings, options, corpus, baseline, isolate=not args.inline,
                       allow_emulated_bf16=args.allow_emulated_bf16, timeout_s=args.timeout,
                       flops_per_token=projection_flops_per_token(checkpoint.config),
                       rounds=args.rounds, ratios=pairs, interleave=args.interleave)
    stderr_log(f"model {checkpoint.name} ({checkpoint.path}); {len(corpus.texts)} texts, "
               f"{corpus.total_tokens} tokens; {len(configs)} rows")
    report = run_offline(plan, probe_machine(openvino_python), progress=stderr_log)
    machine = rep.machine_info()
    print(rep.machine_line(machine))
    print(rep.offline_summary(report))
    print()
    print(rep.offline_table(report))
    if report.ratios:
        print()
        print(rep.ratio_table(report.ratios))
    _write_outputs(args, rep.offline_json(report, machine, _command_line()),
                   lambda path: rep.plot_offline(report, path))
    return 0 if any(r.status == "ok" for r in report.rows) else 1


# --- HTTP ------------------------------------------------------------------------------------------

def _run_http(args: argparse.Namespace) -> int:
    import asyncio

    from bgeserve.bench import report as rep
    from bgeserve.bench.http_load import LoadSettings, resolve_target, run_load
    from bgeserve.bench.model_source import stderr_log

    offline_only = {"--compare": args.compare, "--inline": args.inline, "--query": args.query,
                    "--ratios": args.ratios, "--rounds": args.rounds != 1, "--interleave": args.interleave,
                    "--openvino-python": args.openvino_python,
                    "--outputs": args.outputs != "dense"}
    for flag, value in offline_only.items():
        if value:
            raise UsageError(f"{flag} belongs to the offline mode, not to --url")
    try:
        target = resolve_target(args.url, args.model_name)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        levels = tuple(int(x) for x in args.concurrency.split(",") if x.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise UsageError(f"--concurrency needs positive integers, not {args.concurrency!r}")
    duration = args.duration if args.duration is not None else (None if args.requests else 30.0)
    settings = LoadSettings(concurrency=levels, duration_s=duration, requests=args.requests,
                            batch=args.batch or 1, timeout_s=args.timeout or 60.0)
    source, lines = _read_corpus(args.corpus)
    texts = [line for line in lines if line.strip()]
    if args.limit:
        from bgeserve.bench.offline import spread

        texts = spread(texts, args.limit)
    stderr_log(f"load test of {target.url} ({target.wire} format), {len(texts)} texts from {source}, "
               f"{settings.batch} per request")
    results = asyncio.run(run_load(target, texts, settings, progress=stderr_log))
    print(f"target: {target.url} ({target.wire}); {settings.batch} texts per request; "
          + (f"{duration:g} s" if duration else f"{args.requests} requests") + " per level")
    print()
    print(rep.http_table(results))
    document = rep.http_json(
        results, target,
        {"concurrency": list(levels), "duration_s": duration, "requests": args.requests,
         "batch": settings.batch, "timeout_s": settings.timeout_s, "corpus": source, "texts": len(texts)},
        rep.machine_info(), _command_line(),
    )
    _write_outputs(args, document, lambda path: rep.plot_http(results, path))
    return 0 if all(r.ok for r in results) else 1
