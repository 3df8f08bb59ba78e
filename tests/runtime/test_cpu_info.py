"""The CPU's model, flags and kernel class as read from the operating system, and that the class the doctor
names says what the precision and int8 choices really do on that CPU."""

from __future__ import annotations

import pytest

from bgeserve.runtime import cpu_features, cpu_info, devices

CPUINFO = (
    "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 avx avx2 fma\nbogus line\n\n"
    "processor\t: 1\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
)


def test_model_and_flags_are_read_from_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert cpu_info.cpu_flags(info) == {"fpu", "sse4_2", "avx", "avx2", "fma"}
    assert cpu_info.cpu_model(info) == "AMD EPYC 7B12"
    assert cpu_info.speed_flags(cpu_info.cpu_flags(info)) == ["avx2"]
    assert cpu_info.cpu_flags(tmp_path / "missing") == frozenset()  # not Linux: no VNNI assumed
    assert cpu_info.cpu_model(tmp_path / "missing")  # lscpu's or platform's name instead
    assert "fpu" in cpu_info.cpu_flags()  # this machine's


@pytest.mark.parametrize("name", ["epyc-avx2", "avx2-avx-vnni", "zen5-avx512-bf16", "xeon-amx"])
def test_the_class_says_what_auto_and_int8_do_on_that_cpu(name, simulate_cpu):
    """Each simulated CPU's measured rates make bf16 pay wherever it is native, so the doctor's "takes bf16"
    must hold exactly where dtype=auto then picks it; "s8" exactly where the int8 export stores s8."""
    cpu = simulate_cpu(name)
    _, meaning = cpu_info.cpu_class(cpu_info.speed_flags())
    assert devices.auto_dtype("cpu")[0] == cpu.auto_dtype
    assert ("takes bf16" in meaning) is (cpu.auto_dtype == "bf16")
    assert cpu_features.cpu_has_native_bf16() is (cpu.auto_dtype == "bf16")
    # runtime.onnx_cache stores s8 weights exactly where cpu_has_vnni() holds.
    assert ("stores s8 weights" in meaning) is cpu_features.cpu_has_vnni() is (cpu.int8_weights == "s8")
