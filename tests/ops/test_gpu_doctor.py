"""On a machine with a GPU (run by scripts/gpu_check.sh): the doctor's live verdicts and model check."""

from __future__ import annotations

from pathlib import Path

import pytest

from bgeserve.ops import doctor
from bgeserve.ops.doctor import FAIL, OK
from bgeserve.ops.gpu_probe import probe
from bgeserve.ops.model_check import check_model

pytestmark = pytest.mark.gpu


def test_every_visible_gpu_runs_a_kernel_and_passes_the_doctor() -> None:
    facts = probe()
    assert facts.cuda_available, facts.cuda_error
    assert facts.kernel_test and all(v == "ok" for v in facts.kernel_test.values()), facts.kernel_test
    checks = doctor.run_checks(facts)
    gpus = [c for c in checks if c.name.startswith("gpu cuda:")]
    assert len(gpus) == facts.torch_device_count
    assert all(c.status == OK for c in gpus), doctor.render_table(gpus)
    assert not [c for c in checks if c.status == FAIL], doctor.render_table(checks)
    assert facts.auto_device == "cuda:0"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_model_check_on_cuda(m3_checkpoint: Path, dtype: str) -> None:
    check = check_model(str(m3_checkpoint), "cuda:0", dtype)
    assert check.status == OK, check
    assert f"on cuda:0 ({dtype})" in check.evidence
