"""The benchmark's outputs: the markdown table the team decides with, the JSON document, the PNG plot."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

from bgeserve.bench.http_load import LevelResult, Target
from bgeserve.bench.offline import OfflineReport, PairRatio, Row
from bgeserve.bench.stats import LatencySummary, median

_VERSIONED = ("bgeserve", "torch", "transformers", "onnxruntime", "FlagEmbedding", "numpy")


def machine_info() -> dict:
    """CPU model, its speed-relevant flags, cores and library versions: what a reader needs to compare
    two tables."""
    import torch

    from bgeserve.runtime.cpu_info import cpu_model, speed_flags

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpu_flags": speed_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "versions": versions,
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def machine_line(machine: dict) -> str:
    """One line naming the machine a table was measured on, printed above it."""
    flags = machine.get("cpu_flags") or []
    if flags:
        amx = "" if any(f.startswith("amx") for f in flags) else ", no AMX"
        named = f"({' '.join(flags)}{amx})"
    else:
        named = "(no x86 speed flag read)"
    versions = machine.get("versions", {})
    libraries = ", ".join(f"{name} {versions[name]}" for name in ("torch", "onnxruntime") if versions.get(name))
    line = f"machine: {machine.get('cpu')}, {machine.get('cores')} cores {named}" + (
        f"; {libraries}" if libraries else "")
    if machine.get("gpu"):
        line += "; GPU " + ", ".join(machine["gpu"])
    return line


# --- offline ---------------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _latency(summary: LatencySummary | None) -> str:
    if summary is None:
        return "—"
    return f"{summary.p50:,.0f} / {summary.p95:,.0f} / {summary.p99:,.0f}"


def _fidelity(row: Row) -> tuple[str, str]:
    if not row.fidelity:
        return "—", "—"
    return f"{row.fidelity['min_cosine']:.6f}", f"{row.fidelity['max_abs_diff']:.1e}"


def offline_table(report: OfflineReport) -> str:
    """Markdown table: one row per config and peer; skipped and failed rows say why."""
    corpus = report.corpus
    header = [
        "config", "texts/s", "tokens/s",
        f"query ({corpus.query_tokens} tok) p50 / p95 / p99 ms",
        f"batch ({len(corpus.batch)} texts) p50 / p95 / p99 ms",
        "peak MB", f"speed-up vs {report.baseline or '—'}",
        f"min cos vs {report.reference or 'fp32'}", "max abs diff", "notes",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report.rows:
        notes = list(row.notes)
        if row.status != "ok":
            notes.insert(0, f"{row.status}: {row.reason}")
        min_cos, max_diff = _fidelity(row)
        speedup = _speedup(row)
        if len(row.rounds) > 1:
            notes.append(_per_round(row))
        cells = [
            row.name, _num(row.texts_per_s), _num(row.tokens_per_s, 0), _latency(row.query_ms),
            _latency(row.batch_ms), _num(row.peak_memory_mb, 0), speedup, min_cos, max_diff,
            "; ".join(notes).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _speedup(row: Row) -> str:
    # row.speedup is the median of the rounds' ratios, which the cell also shows the range of.
    if row.speedup is None:
        return "—"
    return _ratio_cell([r.speedup for r in row.rounds if r.speedup is not None])


def _per_round(row: Row) -> str:
    note = "per round: " + " / ".join(f"{r.texts_per_s:.2f}" for r in row.rounds) + " texts/s"
    if any(r.query_p50_ms is not None for r in row.rounds):
        queries = " / ".join("—" if r.query_p50_ms is None else f"{r.query_p50_ms:.0f}" for r in row.rounds)
        note += f", query p50 {queries} ms"
    return note


def _ratio_cell(values: list[float]) -> str:
    if not values:
        return "—"
    if min(values) == max(values):
        return f"{values[0]:.2f}x"
    return f"{median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def ratio_table(ratios: list[PairRatio]) -> str:
    """Markdown table of the asked A/B pairs: each ratio taken within a round, then the median of the rounds.
    Both ratios read the same way: above 1, A is the faster."""
    header = ["A / B", "texts/s: A / B", "query p50: B / A", "rounds", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in ratios:
        cells = [f"{r.a} / {r.b}", _ratio_cell(r.texts_per_s), _ratio_cell(r.query_p50),
                 str(len(r.texts_per_s)), (r.reason or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def offline_summary(report: OfflineReport) -> str:
    """The lines printed above the table: corpus and protocol."""
    c = report.corpus.describe()
    o, s = report.options, report.settings
    return (
        f"corpus: {c['source']}, {c['texts']} texts, {c['tokens']} tokens (mean {c['mean_tokens']:.1f}, "
        f"max {c['max_tokens']}), max_length {s.max_length}, outputs {s.outputs}, batch size {s.batch_size}\n"
        f"protocol: warm-up, then {o.query_runs} query runs, {o.batch_runs} batch runs, "
        f"{o.repeats} corpus passes (texts/s from the median pass); "
        + _process_words(report)
        + (f"; {report.rounds} rounds{_round_order(report)}: texts/s is the median of the rounds, query "
           "percentiles pool every round's calls, a speed-up or ratio is the median of same-round ratios "
           "(min-max in brackets; a query ratio compares each round's p50)"
           if report.rounds > 1 else "")
    )


def _process_words(report: OfflineReport) -> str:
    if report.interleaved:
        return ("every row loaded (and warmed up) once, each in its own process; the query calls, the batch "
                "calls, each corpus pass and the product rate run row by row in alternating order")
    return "one fresh process per row" if report.isolated else "all rows in one process"


def _round_order(report: OfflineReport) -> str:
    return "" if report.interleaved else " in alternating row order"


def offline_json(report: OfflineReport, machine: dict, command: str | None = None) -> dict:
    """The whole run as one JSON-ready document."""
    return {
        "mode": "offline",
        "command": command,
        "machine": machine,
        "corpus": report.corpus.describe(),
        "settings": {
            "model": report.settings.model_path,
            "max_length": report.settings.max_length,
            "batch_size": report.settings.batch_size,
            "flag_batch_size": report.settings.flag_batch_size,
            "outputs": report.settings.outputs,
            "default_threads": report.settings.default_threads,
        },
        "protocol": {
            "repeats": report.options.repeats,
            "query_runs": report.options.query_runs,
            "batch_runs": report.options.batch_runs,
            "warmup": report.options.warmup,
            "process_per_row": report.isolated,
            "rounds": report.rounds,
            "interleaved": report.interleaved,
        },
        "baseline": report.baseline,
        "fidelity_reference": report.reference,
        "rows": [row.as_dict() for row in report.rows],
        "ratios": [ratio.as_dict() for ratio in report.ratios],
    }


# --- HTTP ------------------------------------------------------------------------------------------

def http_table(results: list[LevelResult]) -> str:
    """Markdown table: one row per concurrency level."""
    header = ["concurrency", "requests", "ok", "errors", "texts/s", "tokens/s", "latency p50 / p95 / p99 ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        cells = [str(r.concurrency), str(r.requests), str(r.ok), errors, _num(r.texts_per_s),
                 _num(r.tokens_per_s, 0), _latency(r.latency)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def http_json(results: list[LevelResult], target: Target, settings: dict, machine: dict,
              command: str | None = None) -> dict:
    """The load run as one JSON-ready document."""
    return {
        "mode": "http",
        "command": command,
        "url": target.url,
        "wire": target.wire,
        "settings": settings,
        "client_machine": machine,
        "levels": [r.as_dict() for r in results],
    }


# --- plot ------------------------------------------------------------------------------------------

class PlotUnavailable(RuntimeError):
    """matplotlib is missing."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')"
        ) from exc
    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_offline(report: OfflineReport, path: str | Path) -> None:
    """Two panels: throughput per config, and query/batch latency (p50 bars, p95 whiskers)."""
    plt = _pyplot()
    rows = [r for r in report.rows if r.status == "ok"]
    names = [r.name for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.45 * max(len(rows), 1)))
    y = list(range(len(rows)))
    left.barh(y, [r.texts_per_s for r in rows], color=["#888" if r.config.is_peer else "#2a7" for r in rows])
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel("texts/s (higher is better)")
    left.set_title("throughput")
    for yi, r in zip(y, rows, strict=True):
        left.annotate(f" {r.texts_per_s:.2f}", (r.texts_per_s, yi), va="center", fontsize=8)
    height = 0.4
    for offset, attr, label in ((-height / 2, "query_ms", "single query"), (height / 2, "batch_ms", "batch")):
        p50 = [getattr(r, attr).p50 if getattr(r, attr) else 0.0 for r in rows]
        p95 = [getattr(r, attr).p95 if getattr(r, attr) else 0.0 for r in rows]
        err = [max(0.0, hi - lo) for lo, hi in zip(p50, p95, strict=True)]
        right.barh([yi + offset for yi in y], p50, height=height, xerr=[[0] * len(err), err], label=label)
    right.set_yticks(y, names)
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("latency ms, p50 (whisker: p95; lower is better)")
    right.set_title("latency")
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"bgeserve bench — {report.corpus.describe()['texts']} texts, baseline {report.baseline}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_http(results: list[LevelResult], path: str | Path) -> None:
    """Throughput and latency percentiles against concurrency."""
    plt = _pyplot()
    levels = [r.concurrency for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(levels, [r.texts_per_s for r in results], marker="o")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("texts/s")
    left.set_title("throughput")
    for q in ("p50", "p95", "p99"):
        values = [getattr(r.latency, q) if r.latency else float("nan") for r in results]
        right.plot(levels, values, marker="o", label=q)
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("latency ms")
    right.set_title("latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
