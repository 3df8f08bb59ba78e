"""Config names and the reasons a config is skipped: nothing is silently dropped."""

from __future__ import annotations

import pytest

from bgeserve.bench.configs import (
    BenchConfig,
    MachineFacts,
    parse_compare,
    parse_config,
    parse_config_list,
    skip_reason,
)

ALL_PEERS = frozenset({"FlagEmbedding", "transformers", "onnxruntime"})


def test_parse_names_and_threads():
    assert parse_config("cpu-fp32-t1") == BenchConfig("cpu", "fp32", 1)
    assert parse_config(" CUDA-FP16 ") == BenchConfig("cuda", "fp16", None)
    assert parse_config("transformers-int8-t2").name == "transformers-int8-t2"
    assert parse_config("cuda-bf16").device == "cuda:0"
    assert parse_config("flagembedding-fp16").device == "cuda:0"
    assert parse_config("onnxruntime-int8").device == "cpu"


def test_compiled_rows_of_the_torch_backend():
    assert parse_config("cpu-fp32-compiled") == BenchConfig("cpu", "fp32", None, compiled=True)
    assert parse_config("cuda-bf16-compiled-t4") == BenchConfig("cuda", "bf16", 4, compiled=True)
    assert parse_config("cuda-bf16-compiled-t4").name == "cuda-bf16-compiled-t4"
    assert parse_config("cpu-fp32").compiled is False
    for bad in ("onnx-fp32-compiled", "transformers-fp32-compiled"):
        with pytest.raises(ValueError, match="torch rows"):
            parse_config(bad)
    with pytest.raises(ValueError, match=r"KIND-DTYPE\[-compiled\]\[-graphs\|-qgraph\]\[-tN\]"):
        parse_config("cpu-fp32-t1-compiled")  # the thread suffix comes last
    assert parse_config("cuda-fp16-graphs") == BenchConfig("cuda", "fp16", graphs=True)
    assert parse_config("cuda-bf16-compiled-graphs-t2").name == "cuda-bf16-compiled-graphs-t2"
    for bad in ("cpu-fp32-graphs", "onnx-fp32-graphs"):
        with pytest.raises(ValueError, match="cuda rows"):
            parse_config(bad)


@pytest.mark.parametrize("bad", ["cpu-fp16", "gpu-fp32", "cpu", "cpu-fp32-t0", "cpu-fp32-tx", "cpu-fp32-x1"])
def test_bad_names_say_what_is_accepted(bad):
    with pytest.raises(ValueError, match="cpu-fp32-t1|cpu-fp32"):
        parse_config(bad)


def test_lists_keep_order_and_drop_duplicates():
    names = [c.name for c in parse_config_list("cpu-fp32-t1,cpu-int8,,cpu-fp32-t1,cuda-fp16")]
    assert names == ["cpu-fp32-t1", "cpu-int8", "cuda-fp16"]
    with pytest.raises(ValueError):
        parse_config_list(" , ")


def test_compare_expands_each_peer_into_its_precisions():
    names = [c.name for c in parse_compare("flagembedding,transformers,onnxruntime")]
    assert names == ["flagembedding-fp32", "flagembedding-fp16", "transformers-fp32", "transformers-bf16",
                     "transformers-int8", "onnxruntime-fp32", "onnxruntime-int8"]
    assert [c.name for c in parse_compare("transformers-int8-t1")] == ["transformers-int8-t1"]
    with pytest.raises(ValueError, match="--configs"):
        parse_compare("cpu-fp32")


def test_skip_reasons_on_a_cpu_only_machine_without_bf16():
    facts = MachineFacts(cuda=False, cpu_bf16=False, onnx_backend=False, packages=ALL_PEERS)
    assert skip_reason(parse_config("cpu-fp32"), facts) is None
    assert skip_reason(parse_config("cpu-int8-t1"), facts) is None
    assert "CUDA" in skip_reason(parse_config("cuda-fp16"), facts)
    assert "CUDA" in skip_reason(parse_config("flagembedding-fp16"), facts)
    assert skip_reason(parse_config("onnx-fp32"), facts) == "ONNX backend not available"
    assert "bf16" in skip_reason(parse_config("cpu-bf16"), facts)
    assert "bf16" in skip_reason(parse_config("transformers-bf16"), facts)
    assert skip_reason(parse_config("cpu-bf16"), facts, allow_emulated_bf16=True) is None


def test_skip_reasons_on_a_gpu_machine():
    facts = MachineFacts(cuda=True, cuda_bf16=False, cpu_bf16=True, onnx_backend=True, packages=frozenset())
    assert skip_reason(parse_config("cuda-fp16"), facts) is None
    assert "bf16" in skip_reason(parse_config("cuda-bf16"), facts)
    assert skip_reason(parse_config("cpu-bf16"), facts) is None
    assert skip_reason(parse_config("onnx-int8"), facts) is None
    assert "pip install FlagEmbedding" in skip_reason(parse_config("flagembedding-fp32"), facts)


def test_dense_only_peers_are_skipped_for_all_outputs():
    facts = MachineFacts(packages=ALL_PEERS)
    assert "dense" in skip_reason(parse_config("transformers-fp32"), facts, outputs="all")
    assert skip_reason(parse_config("flagembedding-fp32"), facts, outputs="all") is None
    assert skip_reason(parse_config("cpu-fp32"), facts, outputs="all") is None


def test_compiled_rows_load_under_torch_compile(monkeypatch):
    """`-compiled` / `-graphs` reach Embedder as compile / cuda_graphs (the onnx backend gets neither)."""
    import bgeserve.embedder
    from bgeserve.bench.runners import RunSettings, open_encoder

    seen = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)

    monkeypatch.setattr(bgeserve.embedder, "Embedder", Recorder)
    settings = RunSettings(model_path="unused")
    for name in ("cpu-fp32-compiled", "cpu-fp32", "onnx-fp32", "cuda-fp16-graphs"):
        open_encoder(parse_config(name), settings)
    assert seen[0]["compile"] is True and seen[1]["compile"] is False and seen[1]["cuda_graphs"] is False
    assert "compile" not in seen[2] and seen[2]["backend"] == "onnx"
    assert seen[3]["cuda_graphs"] is True and seen[3]["device"] == "cuda:0"


def test_openvino_rows_are_peers_in_three_precisions():
    names = [c.name for c in parse_compare("openvino")]
    assert names == ["openvino-fp32", "openvino-bf16", "openvino-int8"]
    assert parse_config("openvino-int8-t2") == BenchConfig("openvino", "int8", 2)
    row = parse_config("openvino-fp32")
    assert row.is_peer and row.own_interpreter and row.device == "cpu"
    assert not parse_config("transformers-fp32").own_interpreter and not parse_config("cpu-fp32").own_interpreter
    for bad in ("openvino-fp16", "openvino-fp32-compiled", "openvino-fp32-graphs"):
        with pytest.raises(ValueError):
            parse_config(bad)


def test_openvino_rows_say_how_to_get_their_interpreter():
    """No interpreter, or one without optimum-intel: skipped with the script to run; bgeserve's packages don't count."""
    missing = MachineFacts(cpu_bf16=True, packages=ALL_PEERS | {"optimum.intel"})
    for name in ("openvino-fp32", "openvino-bf16", "openvino-int8"):
        reason = skip_reason(parse_config(name), missing)
        assert "scripts/openvino_venv.sh" in reason and "--openvino-python" in reason
    broken = MachineFacts(cpu_bf16=True, openvino_python="/opt/py/bin/python", openvino_ready=False)
    assert "/opt/py/bin/python cannot import optimum.intel" in skip_reason(parse_config("openvino-fp32"), broken)
    ready = MachineFacts(cpu_bf16=False, openvino_python="/opt/py/bin/python", openvino_ready=True)
    assert skip_reason(parse_config("openvino-fp32"), ready) is None
    assert skip_reason(parse_config("openvino-int8-t1"), ready) is None
    # bf16 follows the CPU rule of every bf16 row; dense only, like the transformers peer.
    assert "native bf16" in skip_reason(parse_config("openvino-bf16"), ready)
    assert skip_reason(parse_config("openvino-bf16"), ready, allow_emulated_bf16=True) is None
    assert "dense" in skip_reason(parse_config("openvino-fp32"), ready, outputs="all")


def test_openvino_interpreter_default_and_probe(tmp_path):
    import sys

    from bgeserve.bench.configs import default_openvino_python, interpreter_has_module

    python = tmp_path / ".venv-openvino" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    assert default_openvino_python(cwd=tmp_path) == str(python)  # the venv's own path, symlink kept
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    found = default_openvino_python(cwd=empty)  # falls back to the checkout's venv, if it has one
    assert found is None or found.endswith(".venv-openvino/bin/python")
    assert interpreter_has_module(str(python), "json") is True
    assert interpreter_has_module(str(python), "no_such_module_here") is False
    assert interpreter_has_module(str(tmp_path / "no-python"), "json") is False


def test_openvino_jobs_run_under_their_interpreter():
    import sys

    from bgeserve.bench.job import Job, interpreter
    from bgeserve.bench.measure import MeasureOptions
    from bgeserve.bench.runners import RunSettings

    settings = RunSettings(model_path="unused", openvino_python="/opt/ov/bin/python")
    job = Job("openvino-int8", settings, MeasureOptions(), ["a"], "a", ["a"])
    assert interpreter(job) == "/opt/ov/bin/python"
    assert interpreter(Job("transformers-fp32", settings, MeasureOptions(), ["a"], "a", ["a"])) == sys.executable
    assert Job.from_json(job.to_json()) == job  # the setting reaches the child process
    with pytest.raises(ValueError, match="openvino_venv.sh"):
        interpreter(Job("openvino-fp32", RunSettings(model_path="unused"), MeasureOptions(), ["a"], "a", ["a"]))
