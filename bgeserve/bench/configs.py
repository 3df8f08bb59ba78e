"""Benchmark config names (`cpu-fp32-t1`, `cuda-fp16`, `transformers-int8`, ...) and why one cannot run.

A name is `KIND-DTYPE[-compiled][-graphs|-qgraph][-tN]`. KIND `cpu`/`cuda` is bgeserve's torch backend,
`onnx` bgeserve's ONNX backend; `flagembedding`, `transformers` and `onnxruntime` are the peers run for comparison.
`bgelite` is bge-m3-lite (onnxruntime with its own tokenizer, pooling and token-budget batching).
`openvino` is optimum-intel's OVModelForFeatureExtraction; its packages conflict with bgeserve's dev pins, so
its rows run under an interpreter of their own (`scripts/openvino_venv.sh` makes `.venv-openvino/`).
`-compiled` (torch backend only) runs it under torch.compile, as `--compile` does; `-graphs` (cuda only)
replays small batches from CUDA graphs, as `--cuda-graphs` does; `-qgraph` (cpu fp32 / bf16 only) runs a lone
text through the compiled query graph, as `--query-graph` does.
`-tN` runs with N intra-op threads (torch or onnxruntime); without it, the library's default.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

OURS = ("cpu", "cuda", "onnx")
TORCH_KINDS = ("cpu", "cuda")  # bgeserve rows on the torch backend: the ones `-compiled` applies to
PEERS = ("flagembedding", "transformers", "onnxruntime", "bgelite", "openvino")
# Precisions each kind offers, in the order `--compare KIND` expands them.
DTYPES: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "bf16", "int8"),
    "cuda": ("fp16", "bf16", "fp32"),
    "onnx": ("fp32", "int8"),
    "flagembedding": ("fp32", "fp16"),
    "transformers": ("fp32", "bf16", "int8"),
    "onnxruntime": ("fp32", "int8"),
    "bgelite": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}
# The Python package each peer needs (import name), and what to `pip install` when it is missing.
PEER_PACKAGES = {
    "flagembedding": "FlagEmbedding",
    "transformers": "transformers",
    "onnxruntime": "onnxruntime",
    "bgelite": "bge_m3_lite",
}
PIP_NAMES = {"bge_m3_lite": "bge-m3-lite"}
# The openvino peer runs under its own interpreter (`--openvino-python`), which must import this module.
OPENVINO_MODULE = "optimum.intel"
OPENVINO_VENV = ".venv-openvino"  # what scripts/openvino_venv.sh makes, at the checkout's root
# Peers that compute bge-m3's sparse and ColBERT outputs too (the others give dense vectors only).
ALL_OUTPUT_PEERS = ("flagembedding", "bgelite")
DEFAULT_CONFIGS = "cpu-fp32-t1,cpu-fp32,cpu-bf16,cpu-int8,onnx-fp32,onnx-int8,cuda-fp16,cuda-bf16"


@dataclass(frozen=True)
class BenchConfig:
    """One row of the benchmark: who runs the model, at which precision, on how many threads."""

    kind: str
    dtype: str
    threads: int | None = None
    compiled: bool = False
    graphs: bool = False
    query_graph: bool = False

    @property
    def name(self) -> str:
        suffix = "-compiled" * self.compiled + "-graphs" * self.graphs + "-qgraph" * self.query_graph
        suffix += f"-t{self.threads}" if self.threads else ""
        return f"{self.kind}-{self.dtype}{suffix}"

    @property
    def is_peer(self) -> bool:
        return self.kind in PEERS

    @property
    def own_interpreter(self) -> bool:
        """Rows that run under `--openvino-python`, never in bgeserve's own environment."""
        return self.kind == "openvino"

    @property
    def device(self) -> str:
        """Where the model runs: only `cuda-*` and FlagEmbedding fp16 use the GPU."""
        on_gpu = self.kind == "cuda" or (self.kind == "flagembedding" and self.dtype == "fp16")
        return "cuda:0" if on_gpu else "cpu"


def parse_config(name: str) -> BenchConfig:
    """`cpu-fp32-t1` -> BenchConfig("cpu", "fp32", 1); ValueError with the accepted names otherwise."""
    parts = name.strip().lower().split("-")
    threads = None
    if len(parts) >= 3 and parts[-1].startswith("t") and parts[-1] != "t":
        try:
            threads = int(parts[-1][1:])
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"bad thread suffix in config {name!r}: use -tN with N >= 1 (e.g. cpu-fp32-t1)")
        parts = parts[:-1]
    graphs = len(parts) >= 3 and parts[-1] == "graphs"
    query_graph = len(parts) >= 3 and parts[-1] == "qgraph"
    if graphs or query_graph:
        parts = parts[:-1]
    compiled = len(parts) == 3 and parts[2] == "compiled"
    if compiled:
        parts = parts[:2]
    if len(parts) != 2 or parts[0] not in DTYPES or parts[1] not in DTYPES[parts[0]]:
        raise ValueError(
            f"unknown config {name!r}; a config is KIND-DTYPE[-compiled][-graphs|-qgraph][-tN], one of: {known_names()}"
        )
    if compiled and parts[0] not in TORCH_KINDS:
        raise ValueError(f"-compiled applies to bgeserve's torch rows ({', '.join(TORCH_KINDS)}), not {name!r}")
    if graphs and parts[0] != "cuda":
        raise ValueError(f"-graphs applies to bgeserve's cuda rows (CUDA graphs), not {name!r}")
    if query_graph and (parts[0] != "cpu" or parts[1] not in ("fp32", "bf16") or compiled):
        raise ValueError(f"-qgraph applies to bgeserve's eager cpu-fp32 and cpu-bf16 rows, not {name!r}")
    return BenchConfig(parts[0], parts[1], threads, compiled, graphs, query_graph)


def known_names() -> str:
    """Every KIND-DTYPE pair, for error messages."""
    return ", ".join(f"{kind}-{dtype}" for kind, dtypes in DTYPES.items() for dtype in dtypes)


def parse_config_list(spec: str) -> list[BenchConfig]:
    """A comma list of config names, duplicates removed (order kept)."""
    configs: list[BenchConfig] = []
    for part in spec.split(","):
        if part.strip():
            config = parse_config(part)
            if config not in configs:
                configs.append(config)
    if not configs:
        raise ValueError("no configs given")
    return configs


def parse_compare(spec: str) -> list[BenchConfig]:
    """`flagembedding,transformers,onnxruntime` -> every precision of each peer; full names pass through."""
    configs: list[BenchConfig] = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if not part:
            continue
        if part in PEERS:
            expanded = [BenchConfig(part, dtype) for dtype in DTYPES[part]]
        else:
            config = parse_config(part)
            if not config.is_peer:
                raise ValueError(f"--compare takes peers ({', '.join(PEERS)}), not {part!r}; use --configs")
            expanded = [config]
        configs += [c for c in expanded if c not in configs]
    return configs


def parse_pairs(spec: str) -> list[tuple[BenchConfig, BenchConfig]]:
    """'a/b,c/d' -> [(a, b), (c, d)], repeats dropped; ValueError for a malformed pair or a row against itself."""
    pairs: list[tuple[BenchConfig, BenchConfig]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        names = [name.strip() for name in item.split("/")]
        if len(names) != 2 or not all(names):
            raise ValueError(f"--ratios takes A/B pairs of configs, not {item!r}")
        a, b = parse_config(names[0]), parse_config(names[1])
        if a == b:
            raise ValueError(f"--ratios {item}: a row against itself")
        if (a, b) not in pairs:
            pairs.append((a, b))
    return pairs


@dataclass(frozen=True)
class MachineFacts:
    """What this machine and Python environment can run; probed once, passed down (tests build their own)."""

    cuda: bool = False
    cuda_bf16: bool = False
    cpu_bf16: bool = False
    onnx_backend: bool = False
    packages: frozenset[str] = field(default_factory=frozenset)
    openvino_python: str | None = None  # the interpreter for openvino rows, when one was given or found
    openvino_ready: bool = False  # it imports optimum.intel


def probe_machine(openvino_python: str | None = None) -> MachineFacts:
    """Looks at torch, the CPU, the installed packages and the openvino rows' interpreter."""
    import torch

    cuda = torch.cuda.is_available()
    try:
        # oneDNN's own test for native bf16 (AVX512-BF16 or AMX); without it bf16 matmuls are emulated.
        cpu_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        cpu_bf16 = False
    packages = frozenset(p for p in PEER_PACKAGES.values() if importlib.util.find_spec(p) is not None)
    return MachineFacts(
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        cpu_bf16=cpu_bf16,
        onnx_backend=onnx_backend_available(),
        packages=packages,
        openvino_python=openvino_python,
        openvino_ready=bool(openvino_python and interpreter_has_module(openvino_python, OPENVINO_MODULE)),
    )


def default_openvino_python(cwd: Path | None = None) -> str | None:
    """`.venv-openvino/bin/python` of the current directory, else of bgeserve's checkout, when it exists."""
    checkout = Path(__file__).resolve().parents[2]  # the repository root of an editable install
    for root in (cwd or Path.cwd(), checkout):
        python = root / OPENVINO_VENV / "bin" / "python"
        if python.exists():
            return str(python)
    return None


def interpreter_has_module(python: str, module: str, timeout_s: float = 60.0) -> bool:
    """True when `python` runs and finds `module` (found, not imported: optimum.intel takes seconds to import)."""
    check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        done = subprocess.run([python, "-c", check], capture_output=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def onnx_backend_available() -> bool:
    """True once bgeserve has an ONNX backend that Embedder can select (`backend="onnx"`)."""
    if importlib.util.find_spec("bgeserve.runtime.onnx_backend") is None:
        return False
    from bgeserve.embedder import Embedder

    # Embedder swallows unknown keywords, so without this check onnx rows would silently run torch.
    return "backend" in inspect.signature(Embedder).parameters


def skip_reason(
    config: BenchConfig, facts: MachineFacts, outputs: str = "dense", allow_emulated_bf16: bool = False
) -> str | None:
    """Why `config` cannot run here, or None when it can."""
    if config.kind == "onnx" and not facts.onnx_backend:
        return "ONNX backend not available"
    if config.own_interpreter:
        reason = _openvino_problem(facts)
        if reason:
            return reason
    elif config.is_peer:
        package = PEER_PACKAGES[config.kind]
        if package not in facts.packages:
            return f"{package} is not installed (pip install {PIP_NAMES.get(package, package)})"
    if config.is_peer and outputs == "all" and config.kind not in ALL_OUTPUT_PEERS:
        return "this peer computes dense vectors only (no sparse or ColBERT heads)"
    if config.device.startswith("cuda"):
        if not facts.cuda:
            return "no CUDA device visible to torch"
        if config.dtype == "bf16" and not facts.cuda_bf16:
            return "this GPU has no bf16 support"
    elif config.dtype == "bf16" and not facts.cpu_bf16 and not allow_emulated_bf16:
        return ("this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would be emulated "
                "and slower than fp32; --allow-emulated-bf16 measures it anyway")
    return None


def _openvino_problem(facts: MachineFacts) -> str | None:
    """Why the openvino rows' interpreter cannot run them, or None."""
    fix = "run scripts/openvino_venv.sh (or pass --openvino-python PATH)"
    if facts.openvino_python is None:
        return f"no interpreter with {OPENVINO_MODULE} (optimum-intel): {fix}"
    if not facts.openvino_ready:
        return f"{facts.openvino_python} cannot import {OPENVINO_MODULE} (optimum-intel): {fix}"
    return None
