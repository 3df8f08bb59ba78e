"""The onnxruntime runtime: one exported graph (encoder + all heads), fp32 or int8, CPU or CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bgeserve.core import BackendOptions, ItemOutput, OutputRequest
from bgeserve.errors import DeviceUnavailable
from bgeserve.models.checkpoint import Checkpoint
from bgeserve.models.packed import PackedBatch, attention_groups
from bgeserve.runtime.devices import canonical_dtype, resolve_device
from bgeserve.runtime.onnx_cache import ensure_onnx_model
from bgeserve.runtime.onnx_export import COLBERT, HIDDEN, TOKEN_WEIGHTS, packed_inputs
from bgeserve.runtime.packed_outputs import PackedBackend, PackedResult, cls_rows_suffice

log = logging.getLogger(__name__)

_DTYPES = {"cpu": ("fp32", "int8"), "cuda": ("fp32",)}


def _import_onnxruntime():  # noqa: ANN202 - the module
    try:
        import onnxruntime
    except ImportError as exc:
        raise DeviceUnavailable(
            "the onnx backend needs onnxruntime, which is not installed: pip install 'bgeserve[onnx]' "
            "(onnxruntime-gpu for CUDA), or use --backend torch"
        ) from exc
    return onnxruntime


def _onnx_device(spec: str | None) -> str:
    """Like devices.resolve_device, but an explicit cuda:N is taken as is: onnxruntime-gpu may run CUDA
    beside a CPU-only torch, which resolve_device would reject."""
    name = (spec or "auto").strip().lower()
    if name == "cuda":
        return "cuda:0"
    if name.startswith("cuda:") and name[5:].isdigit():
        return name
    return resolve_device(name)


def resolve_onnx_dtype(dtype: str | None, device: str) -> str:
    """'auto' -> fp32; fp32 anywhere, int8 on CPU. Anything else is a clear error, not a silent fp32."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    name = canonical_dtype(dtype)
    if name == "auto":
        return "fp32"
    if name not in _DTYPES[kind]:
        hint = "use --backend torch for fp16/bf16" if name in ("fp16", "bf16") else ""
        raise ValueError(
            f"the onnx backend runs {' or '.join(_DTYPES[kind])} on {kind}, not {dtype!r}"
            + (f"; {hint}" if hint else "")
        )
    return name


class OnnxBackend(PackedBackend):
    """One onnxruntime session on one device.

    The first load exports the model (seconds for small models, ~1-2 minutes for bge-m3) and caches it;
    later loads reuse the cached file (see `runtime.onnx_cache`).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str = "cpu",
        options: BackendOptions | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        """`options` default: fp32 on onnxruntime's own thread count."""
        super().__init__(checkpoint)
        options = options or BackendOptions(backend="onnx", dtype="fp32")
        ort = _import_onnxruntime()
        self.device = _onnx_device(device)
        self.dtype = resolve_onnx_dtype(options.dtype, self.device)
        providers = self._providers(ort)
        self.model_path = ensure_onnx_model(checkpoint, self.dtype, cache_dir)
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # One graph runs at a time per replica: parallelism comes from intra-op threads only.
        session_options.inter_op_num_threads = 1
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        self.session = ort.InferenceSession(str(self.model_path), sess_options=session_options, providers=providers)
        log.info(
            "loaded %s with onnxruntime on %s (%s, %s)",
            checkpoint.name,
            self.device,
            self.dtype,
            self.session.get_providers()[0],
        )

    def _providers(self, ort) -> list:  # noqa: ANN001 - the onnxruntime module
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceUnavailable(
                f"device {self.device} asked of the onnx backend, but this onnxruntime "
                f"({ort.__version__}) has no CUDAExecutionProvider: pip uninstall onnxruntime && "
                f"pip install onnxruntime-gpu, or use --backend torch"
            )
        device_id = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]

    def run(self, batch: list[list[int]], want: OutputRequest) -> list[ItemOutput]:
        """PackedBackend.run on each group of similar lengths (models.packed.attention_groups) in turn: the
        graph's attention runs in the padded layout, so one long text must not pad a batch of short ones.
        On the CPU only, where it was measured: a GPU pads cheaply and pays per session run."""
        if self.device != "cpu":
            return super().run(batch, want)
        groups = attention_groups([len(seq) for seq in batch])
        if len(groups) <= 1:
            return super().run(batch, want)
        items: dict[int, ItemOutput] = {}
        for group in groups:
            items.update(zip(group, super().run([batch[i] for i in group], want), strict=True))
        return [items[i] for i in range(len(batch))]

    def _forward(self, batch: list[list[int]], want: OutputRequest) -> tuple[PackedBatch, PackedResult]:
        packed = PackedBatch.from_sequences(batch)
        cls_only = cls_rows_suffice(want, self.checkpoint.pooling)
        inputs = packed_inputs(packed, self.checkpoint.config, packed.starts if cls_only else None)
        feed = {name: t.numpy() for name, t in inputs.items()}
        names = [HIDDEN] + [TOKEN_WEIGHTS] * want.sparse + [COLBERT] * want.colbert
        outputs = dict(zip(names, self.session.run(names, feed), strict=True))
        return packed, PackedResult(
            hidden=torch.from_numpy(outputs[HIDDEN]),
            token_weights=torch.from_numpy(outputs[TOKEN_WEIGHTS]) if want.sparse else None,
            colbert=torch.from_numpy(outputs[COLBERT]) if want.colbert else None,
            cls_only=cls_only,
        )
