"""One small probing layer for the facts `bgeserve doctor` judges: torch build, driver, nvcc, GPUs.

Everything the doctor knows about the machine comes through `GpuFacts`, gathered live by `probe()` or
loaded from a recorded JSON file by `load_facts()`, so tests can replay machines we do not have
(a 4 x RTX 5090 box with a cu121 torch, an old driver, ...). `probe()` tolerates the absence of
torch, CUDA, nvidia-smi, nvcc and onnxruntime: an absent tool is a fact, not an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgeserve.runtime.cpu_info import cpu_flags, cpu_model, speed_flags

# Outside tools must answer quickly; a hung nvidia-smi (a wedged driver) must not hang the doctor.
_TOOL_TIMEOUT_S = 20.0


@dataclass
class GpuInfo:
    """One NVIDIA GPU as the driver (nvidia-smi / NVML) or torch reports it."""

    index: int
    name: str
    memory_mib: int | None = None
    capability: tuple[int, int] | None = None
    uuid: str | None = None

    @property
    def sm(self) -> str | None:
        """The architecture name, e.g. `sm_120` for capability (12, 0)."""
        if self.capability is None:
            return None
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass
class GpuFacts:
    """Everything the doctor needs to know about the Python, torch and GPU side of a machine."""

    python_version: str = ""
    platform: str = ""
    torch_version: str | None = None  # None: torch is not importable
    torch_error: str | None = None  # why torch could not be imported
    torch_cuda: str | None = None  # torch.version.cuda: the CUDA runtime torch was built for; None = CPU
    torch_hip: str | None = None
    cudnn_version: int | None = None  # torch.backends.cudnn.version(), e.g. 90100
    arch_list: list[str] = field(default_factory=list)  # torch.cuda.get_arch_list()
    cuda_available: bool = False  # torch.cuda.is_available()
    cuda_error: str | None = None  # what torch said when CUDA did not initialise
    torch_device_count: int = 0  # GPUs torch sees (after CUDA_VISIBLE_DEVICES)
    torch_warnings: list[str] = field(default_factory=list)  # e.g. "sm_120 is not compatible ..."
    kernel_test: dict[str, str] = field(default_factory=dict)  # "cuda:0" -> "ok" or the error text
    driver_version: str | None = None  # None: no nvidia-smi / NVML answered
    driver_cuda_version: str | None = None  # highest CUDA the driver supports (nvidia-smi header)
    nvcc_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_source: str = "none"  # "nvidia-smi" (physical GPUs), "torch" (already filtered), or "none"
    cuda_visible_devices: str | None = None  # as set; None = unset
    device_env: str | None = None  # DEVICE as set; None = unset
    auto_device: str | None = None  # what DEVICE=auto resolves to; None = derive from the facts
    onnxruntime_version: str | None = None
    onnxruntime_providers: list[str] = field(default_factory=list)
    packages: dict[str, str | None] = field(default_factory=dict)  # dependency -> installed version
    requirements: list[str] = field(default_factory=list)  # bgeserve's declared dependencies
    cpu_model: str = ""  # runtime.cpu_info.cpu_model(); "" = not probed (older recordings)
    cpu_cores: int = 0  # os.cpu_count()
    cpu_flags: list[str] = field(default_factory=list)  # the speed-relevant ones (runtime.cpu_info.SPEED_FLAGS)
    cpu_flags_read: bool = False  # whether /proc/cpuinfo gave any flags at all

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `facts_from_dict` reads it back."""
        data = dataclasses.asdict(self)
        for gpu in data["gpus"]:
            if gpu["capability"] is not None:
                gpu["capability"] = list(gpu["capability"])
        return data

    def visible_gpus(self) -> list[GpuInfo]:
        """The GPUs a CUDA program started now would see, in its ordinal order (cuda:0 first)."""
        if self.gpu_source == "torch":
            return list(self.gpus)
        return apply_visible_devices(self.gpus, self.cuda_visible_devices)


def apply_visible_devices(gpus: list[GpuInfo], visible: str | None) -> list[GpuInfo]:
    """Filters and reorders physical GPUs the way the CUDA runtime reads `CUDA_VISIBLE_DEVICES`.

    Unset means all; an empty string means none; entries are indices or UUID prefixes and the
    list stops at the first entry that matches nothing (that is what CUDA does).
    """
    if visible is None:
        return list(gpus)
    chosen: list[GpuInfo] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if not entry:
            break
        match: GpuInfo | None = None
        if entry.lstrip("-").isdigit():
            number = int(entry)
            match = next((g for g in gpus if g.index == number), None)
        else:
            match = next((g for g in gpus if g.uuid and g.uuid.startswith(entry)), None)
        if match is None or match in chosen:
            break
        chosen.append(match)
    return chosen


def facts_from_dict(data: dict[str, Any]) -> GpuFacts:
    """Builds `GpuFacts` from `to_dict()` output, or from a `doctor --json` report (its "facts")."""
    if "facts" in data and isinstance(data["facts"], dict):
        data = data["facts"]
    known = {f.name for f in dataclasses.fields(GpuFacts)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown fields in recorded facts: {sorted(unknown)}")
    values = dict(data)
    gpus = []
    for entry in values.pop("gpus", []):
        cap = entry.get("capability")
        gpus.append(
            GpuInfo(
                index=int(entry["index"]),
                name=str(entry["name"]),
                memory_mib=entry.get("memory_mib"),
                capability=(int(cap[0]), int(cap[1])) if cap is not None else None,
                uuid=entry.get("uuid"),
            )
        )
    return GpuFacts(gpus=gpus, **values)


def load_facts(path: str | Path) -> GpuFacts:
    """Reads recorded facts from a JSON file (a fixture, or the output of `bgeserve doctor --json`)."""
    with open(path, encoding="utf-8") as handle:
        return facts_from_dict(json.load(handle))


def probe(kernel_test: bool = True) -> GpuFacts:
    """Gathers the facts of this machine; never raises because a tool is missing.

    `kernel_test` runs one tiny op on each visible GPU: it is the only way to see "no kernel image is
    available for execution on the device" before the service does.
    """
    facts = GpuFacts(
        python_version=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        device_env=os.environ.get("DEVICE"),
    )
    _probe_driver(facts)
    facts.nvcc_version = _nvcc_version()
    _probe_torch(facts, kernel_test)
    _probe_onnxruntime(facts)
    _probe_packages(facts)
    facts.auto_device = _auto_device(facts)
    flags = cpu_flags()
    facts.cpu_model, facts.cpu_cores, facts.cpu_flags = cpu_model(), os.cpu_count() or 0, speed_flags(flags)
    facts.cpu_flags_read = bool(flags)
    return facts


def _run(argv: list[str]) -> str | None:
    """Runs an outside tool and returns its stdout, or None when it is absent or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _probe_driver(facts: GpuFacts) -> None:
    """Driver version and the physical GPUs, from nvidia-smi (present wherever the driver is)."""
    listing = _run(
        [
            "nvidia-smi",
            "--query-gpu=index,name,memory.total,compute_cap,uuid,driver_version",
            "--format=csv,noheader,nounits",
        ]
    )
    if listing is None:
        # Drivers older than 510 lack the compute_cap field; ask again without it.
        listing = _run(
            [
                "nvidia-smi",
                "--query-gpu=index,name,memory.total,uuid,driver_version",
                "--format=csv,noheader,nounits",
            ]
        )
        with_cap = False
    else:
        with_cap = True
    if listing is None:
        _probe_nvml(facts)
        return
    for line in listing.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if with_cap and len(parts) == 6:
            index, name, memory, cap, uuid, driver = parts
        elif not with_cap and len(parts) == 5:
            index, name, memory, uuid, driver = parts
            cap = ""
        else:
            continue
        facts.driver_version = driver
        facts.gpus.append(
            GpuInfo(
                index=int(index),
                name=name,
                memory_mib=int(float(memory)) if _is_number(memory) else None,
                capability=_parse_capability(cap),
                uuid=uuid or None,
            )
        )
    facts.gpu_source = "nvidia-smi" if facts.gpus else "none"
    header = _run(["nvidia-smi"])
    if header:
        found = re.search(r"CUDA Version:\s*([0-9.]+)", header)
        if found:
            facts.driver_cuda_version = found.group(1)


def _probe_nvml(facts: GpuFacts) -> None:
    """Without nvidia-smi (slim containers), NVML through `pynvml` (nvidia-ml-py) gives the same facts."""
    try:
        import pynvml
    except ImportError:
        return
    try:
        pynvml.nvmlInit()
    except Exception:
        return
    try:
        facts.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12080
        facts.driver_cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            facts.gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_mib=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)),
                    capability=(int(major), int(minor)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                )
            )
        facts.gpu_source = "nvidia-smi" if facts.gpus else "none"  # physical GPUs, like nvidia-smi's
    except Exception:
        return
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    """pynvml returns bytes in old releases and str in new ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvcc_version() -> str | None:
    """The CUDA toolkit release of `nvcc` on PATH, e.g. "12.8"."""
    output = _run(["nvcc", "--version"])
    if output is None:
        return None
    found = re.search(r"release\s+([0-9]+\.[0-9]+)", output)
    return found.group(1) if found else None


def _probe_torch(facts: GpuFacts, kernel_test: bool) -> None:
    """torch's build and what it sees; catches the warnings torch prints for unsupported GPUs."""
    try:
        import torch
    except Exception as exc:  # an ImportError, or a broken install raising OSError on a missing .so
        facts.torch_error = f"{type(exc).__name__}: {exc}"
        return
    facts.torch_version = str(torch.__version__)
    facts.torch_cuda = getattr(torch.version, "cuda", None)
    facts.torch_hip = getattr(torch.version, "hip", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            facts.cudnn_version = torch.backends.cudnn.version() if facts.torch_cuda else None
        except Exception:
            facts.cudnn_version = None
        try:
            facts.arch_list = list(torch.cuda.get_arch_list())
            facts.cuda_available = bool(torch.cuda.is_available())
            facts.torch_device_count = torch.cuda.device_count() if facts.cuda_available else 0
        except Exception as exc:
            facts.cuda_error = f"{type(exc).__name__}: {exc}"
        if facts.cuda_available:
            torch_gpus = []
            for ordinal in range(facts.torch_device_count):
                try:
                    props = torch.cuda.get_device_properties(ordinal)
                    torch_gpus.append(
                        GpuInfo(
                            index=ordinal,
                            name=props.name,
                            memory_mib=int(props.total_memory // (1024 * 1024)),
                            capability=(int(props.major), int(props.minor)),
                        )
                    )
                except Exception as exc:
                    facts.kernel_test[f"cuda:{ordinal}"] = f"{type(exc).__name__}: {exc}"
            if not facts.gpus:
                # No nvidia-smi: torch's list is all we have, already filtered by CUDA_VISIBLE_DEVICES.
                facts.gpus = torch_gpus
                facts.gpu_source = "torch" if torch_gpus else "none"
            else:
                _fill_capabilities(facts.visible_gpus(), torch_gpus)
            if kernel_test:
                for ordinal in range(facts.torch_device_count):
                    facts.kernel_test.setdefault(f"cuda:{ordinal}", _kernel_test(torch, ordinal))
        elif facts.torch_cuda and facts.cuda_error is None and facts.gpus:
            facts.cuda_error = _cuda_init_error(torch)
    facts.torch_warnings = [_one_paragraph(str(w.message)) for w in caught]


def _fill_capabilities(visible: list[GpuInfo], torch_gpus: list[GpuInfo]) -> None:
    """Old drivers' nvidia-smi has no compute_cap: take it from torch, whose ordinals follow `visible`."""
    for gpu, seen in zip(visible, torch_gpus, strict=False):
        if gpu.capability is None:
            gpu.capability = seen.capability


def _kernel_test(torch: Any, ordinal: int) -> str:
    """Runs one elementwise op on a GPU; returns "ok" or the error torch raised."""
    try:
        value = (torch.ones(4, device=f"cuda:{ordinal}") * 2).sum().item()
        torch.cuda.synchronize(ordinal)
    except Exception as exc:
        # The first line carries the verdict; the rest is CUDA's generic advice on async errors.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}"
    return "ok" if value == 8.0 else f"wrong result {value} (expected 8.0)"


def _cuda_init_error(torch: Any) -> str | None:
    """The reason torch gives when CUDA does not initialise (e.g. a driver too old)."""
    try:
        torch.cuda.init()
    except Exception as exc:
        return _one_paragraph(f"{type(exc).__name__}: {exc}")
    return None


def _probe_onnxruntime(facts: GpuFacts) -> None:
    try:
        import onnxruntime
    except Exception:
        return
    facts.onnxruntime_version = str(getattr(onnxruntime, "__version__", "unknown"))
    try:
        facts.onnxruntime_providers = list(onnxruntime.get_available_providers())
    except Exception:
        facts.onnxruntime_providers = []


def _probe_packages(facts: GpuFacts) -> None:
    """bgeserve's declared dependencies and the version of each that is installed."""
    from importlib import metadata

    facts.requirements = declared_requirements()
    for requirement in facts.requirements:
        name = requirement_name(requirement)
        try:
            facts.packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            facts.packages[name] = None


def declared_requirements() -> list[str]:
    """bgeserve's runtime requirements: from its installed metadata, else from the source pyproject."""
    from importlib import metadata

    try:
        found = metadata.requires("bgeserve") or []
        # Extras (`; extra == "dev"`) are optional: only the unconditional ones must be there.
        return [r for r in found if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    import tomllib

    with open(pyproject, "rb") as handle:
        return list(tomllib.load(handle).get("project", {}).get("dependencies", []))


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement string, e.g. "torch" for "torch>=2.4,<2.15"."""
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return found.group(1) if found else requirement.strip()


def _auto_device(facts: GpuFacts) -> str:
    """What `DEVICE=auto` picks: the runtime's own rule when it is importable, else the same rule here."""
    try:
        from bgeserve.runtime.devices import resolve_device
    except ImportError:
        return auto_device_rule(facts)
    try:
        return resolve_device("auto")
    except Exception:
        return auto_device_rule(facts)


def auto_device_rule(facts: GpuFacts) -> str:
    """`DEVICE=auto` from facts alone: cuda:0 when torch can use a visible GPU, else cpu."""
    if facts.cuda_available and facts.torch_device_count > 0:
        return "cuda:0"
    return "cpu"


def _parse_capability(text: str) -> tuple[int, int] | None:
    found = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _one_paragraph(text: str) -> str:
    """Warnings and CUDA errors span many lines; keep them readable in one table cell."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


if __name__ == "__main__":  # `python -m bgeserve.ops.gpu_probe` prints this machine's facts
    json.dump(probe().to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
