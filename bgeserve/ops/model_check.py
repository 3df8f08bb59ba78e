"""`bgeserve doctor --model`: the one check that loads a model and runs it, kept apart from the pure verdicts."""

from __future__ import annotations

import math
import time

from bgeserve.ops.doctor import FAIL, OK, Check, short_text


def check_model(model: str | None, device: str, dtype: str = "auto", text: str = "What is BGE M3?") -> Check:
    """Loads a model with `Embedder`, embeds one text, and checks the vector is finite and unit length.

    Errors (a missing model, a GPU without kernels) become a failed check, never a traceback.
    """
    name = "model"
    try:
        import numpy as np

        from bgeserve.embedder import Embedder
    except ImportError as exc:
        return Check(name, FAIL, f"cannot import the embedder: {exc}", "pip install -e .")
    started = time.perf_counter()
    try:
        embedder = Embedder(model=model, device=device, dtype=dtype)
        load_s = time.perf_counter() - started
        caps = getattr(embedder.checkpoint, "capabilities", None)
        # A bge-m3 checkpoint answers all three outputs from one pass: check them all.
        want_sparse, want_colbert = bool(getattr(caps, "sparse", False)), bool(getattr(caps, "colbert", False))
        # the first call pays for lazy initialisation; time the second
        embedder.encode([text], return_sparse=want_sparse, return_colbert_vecs=want_colbert)
        started = time.perf_counter()
        out = embedder.encode([text], return_sparse=want_sparse, return_colbert_vecs=want_colbert)
        query_ms = (time.perf_counter() - started) * 1000
    except Exception as exc:  # noqa: BLE001 - any failure here is the verdict itself
        return Check(
            name,
            FAIL,
            f"{model or 'bundled MiniLM'} on {device}: {type(exc).__name__}: {short_text(str(exc))}",
            "fix the failing checks above first; DEVICE=cpu shows whether the model itself loads",
        )
    vector = np.asarray(out["dense_vecs"], dtype=np.float64).reshape(-1)
    label = (
        f"{getattr(embedder.checkpoint, 'name', model)} on {getattr(embedder, 'device', device)} "
        f"({getattr(embedder, 'dtype', dtype)}): loaded in {load_s:.2f} s, one query {query_ms:.1f} ms, "
        f"dim {vector.size}"
    )
    if vector.size == 0 or not np.all(np.isfinite(vector)):
        bad = int(np.size(vector) - np.isfinite(vector).sum())
        return Check(name, FAIL, f"{label}; {bad} non-finite values", "try dtype fp32 or bf16 (fp16 overflows)")
    norm = float(np.linalg.norm(vector))
    if not math.isclose(norm, 1.0, abs_tol=1e-2):
        return Check(name, FAIL, f"{label}; norm {norm:.4f}, expected 1", "the checkpoint or pooling is wrong")
    extra = []
    if out.get("lexical_weights") is not None:
        weights = np.asarray(list(out["lexical_weights"][0].values()), dtype=np.float64)
        if not np.all(np.isfinite(weights)):
            return Check(name, FAIL, f"{label}; non-finite sparse weights", "try dtype fp32 or bf16")
        extra.append(f"sparse {weights.size} terms")
    if out.get("colbert_vecs") is not None:
        colbert = np.asarray(out["colbert_vecs"][0], dtype=np.float64)
        if not np.all(np.isfinite(colbert)):
            return Check(name, FAIL, f"{label}; non-finite ColBERT vectors", "try dtype fp32 or bf16")
        extra.append(f"colbert {colbert.shape[0]} rows")
    return Check(name, OK, f"{label}; finite, norm {norm:.4f}" + "".join(f", {e}" for e in extra))
