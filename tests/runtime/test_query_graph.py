"""The compiled lone-text graph (AOTInductor): the eager path's results, its cache, and where it applies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bgeserve import cache_files
from bgeserve.api.settings import ServeSettings
from bgeserve.bench.configs import parse_config
from bgeserve.core import BackendOptions, OutputRequest
from bgeserve.errors import CompileFailed
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.runtime import query_graph, torch_backend
from bgeserve.runtime.query_graph import CACHE_SUBDIR, PACKAGE_FILE, QueryGraph, graph_key, graph_variant
from bgeserve.runtime.torch_backend import TorchBackend

# Inductor compiles C++: without a compiler there is no graph (that error's test needs none).
HAS_COMPILER = any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler for Inductor")

ALL = OutputRequest(dense=True, sparse=True, colbert=True)
DENSE = OutputRequest()
TEXTS = [[0, 5, 6, 7, 8, 2], [0, 9, 2], [0, *range(10, 60), 2]]


@pytest.fixture(scope="module")
def model_dir(m3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bge-m3: its graphs are written beside it, which the shared fixture must not get."""
    return Path(shutil.copytree(m3_checkpoint, tmp_path_factory.mktemp("query-graph") / "m3"))


@pytest.fixture(scope="module")
def eager_fp32(model_dir: Path) -> TorchBackend:
    return TorchBackend(load_checkpoint(str(model_dir)), "cpu", BackendOptions(dtype="fp32"))


@pytest.fixture(scope="module")
def graphed_fp32(model_dir: Path) -> TorchBackend:
    return TorchBackend(load_checkpoint(str(model_dir)), "cpu", BackendOptions(dtype="fp32", query_graph=True))


class CountingGraph:
    """Wraps a QueryGraph and counts its calls (the backend's choice of path is what is under test)."""

    def __init__(self, graph: QueryGraph) -> None:
        self.graph, self.calls = graph, 0

    def fits(self, tokens: int) -> bool:
        return self.graph.fits(tokens)

    def __call__(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.graph(hidden, rows)


@pytest.fixture()
def counted(graphed_fp32: TorchBackend, monkeypatch: pytest.MonkeyPatch) -> CountingGraph:
    assert graphed_fp32._query_graph is not None
    counter = CountingGraph(graphed_fp32._query_graph)
    monkeypatch.setattr(graphed_fp32, "_query_graph", counter)
    return counter


@needs_compiler
@pytest.mark.parametrize("text", TEXTS, ids=["6 tokens", "3 tokens", "52 tokens"])
def test_a_lone_text_through_the_graph_has_the_eager_fp32_results(graphed_fp32, eager_fp32, counted, text):
    # One graph for every length: the token count is a dynamic dimension.
    for want in (DENSE, ALL):
        got, = graphed_fp32.run([text], want)
        ref, = eager_fp32.run([text], want)
        np.testing.assert_allclose(got.dense, ref.dense, atol=1e-5)
        if want.sparse:
            assert got.lexical_weights.keys() == ref.lexical_weights.keys()
            np.testing.assert_allclose(list(got.lexical_weights.values()), list(ref.lexical_weights.values()),
                                       atol=1e-5)
            np.testing.assert_allclose(got.colbert, ref.colbert, atol=1e-5)
    assert counted.calls == 2


@needs_compiler
def test_batches_of_several_texts_stay_on_the_eager_path(graphed_fp32, eager_fp32, counted):
    got = graphed_fp32.run(TEXTS, ALL)
    assert counted.calls == 0
    for ours, ref in zip(got, eager_fp32.run(TEXTS, ALL), strict=True):
        np.testing.assert_allclose(ours.dense, ref.dense, atol=1e-5)


@needs_compiler
def test_bf16_graph_stays_as_close_to_fp32_as_eager_bf16(model_dir, eager_fp32):
    ckpt = load_checkpoint(str(model_dir))
    graphed = TorchBackend(ckpt, "cpu", BackendOptions(dtype="bf16", query_graph=True))
    eager = TorchBackend(ckpt, "cpu", BackendOptions(dtype="bf16"))
    assert graphed._query_graph is not None and "-bf16-" in graphed._query_graph.path.name
    for text in TEXTS:
        ref = eager_fp32.run([text], DENSE)[0].dense
        graph_cos = float(graphed.run([text], DENSE)[0].dense @ ref)  # unit vectors
        eager_cos = float(eager.run([text], DENSE)[0].dense @ ref)
        assert graph_cos > 0.999
        assert abs(graph_cos - eager_cos) < 1e-3


@needs_compiler
def test_the_graph_is_compiled_once_and_reused(model_dir, graphed_fp32, monkeypatch):
    def no_compile(*_args: object) -> None:
        raise AssertionError("the cached graph should have been loaded")

    monkeypatch.setattr(query_graph, "compile_package", no_compile)
    again = TorchBackend(load_checkpoint(str(model_dir)), "cpu", BackendOptions(dtype="fp32", query_graph=True))
    assert again._query_graph is not None
    assert again._query_graph.path == graphed_fp32._query_graph.path
    assert again._query_graph.path.parent == model_dir / CACHE_SUBDIR
    assert [p.name for p in again._query_graph.path.iterdir()] == [PACKAGE_FILE]
    assert again.run([TEXTS[0]], DENSE)[0].dense.shape == (32,)


def test_a_graph_that_cannot_be_compiled_is_a_clear_error_and_leaves_no_cache_entry(model_dir, tmp_path, monkeypatch):
    def no_compiler(*_args: object) -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(query_graph, "compile_package", no_compiler)
    fresh = Path(shutil.copytree(model_dir, tmp_path / "m3", ignore=shutil.ignore_patterns(CACHE_SUBDIR)))
    with pytest.raises(CompileFailed, match=r"No working C\+\+ compiler found\); it needs a working C\+\+ compiler"):
        TorchBackend(load_checkpoint(str(fresh)), "cpu", BackendOptions(dtype="fp32", query_graph=True))
    assert not [p for p in (fresh / CACHE_SUBDIR).iterdir() if p.is_dir()]  # the build's lock file may stay


@needs_compiler
def test_a_cached_graph_that_does_not_load_names_the_directory_to_delete(model_dir, tmp_path):
    fresh = Path(shutil.copytree(model_dir, tmp_path / "m3", ignore=shutil.ignore_patterns(CACHE_SUBDIR)))
    ckpt = load_checkpoint(str(fresh))
    target = query_graph.graph_location(ckpt, graph_key(ckpt), graph_variant("fp32"))
    target.mkdir(parents=True)
    (target / PACKAGE_FILE).write_bytes(b"not a package")
    with pytest.raises(CompileFailed, match="delete that directory"):
        TorchBackend(ckpt, "cpu", BackendOptions(dtype="fp32", query_graph=True))


def test_the_key_changes_with_the_weights_and_the_token_limit(model_dir, tmp_path):
    ckpt = load_checkpoint(str(model_dir))
    key = graph_key(ckpt)
    assert graph_key(load_checkpoint(str(model_dir))) == key
    copy = Path(shutil.copytree(model_dir, tmp_path / "m3", ignore=shutil.ignore_patterns(CACHE_SUBDIR)))
    weights = copy / ckpt.weights_file.name
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert graph_key(load_checkpoint(str(copy))) != key
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"max_position_embeddings": ', '"max_position_embeddings": 1'))
    assert load_checkpoint(str(copy)).max_length != ckpt.max_length
    assert graph_key(load_checkpoint(str(copy))) != key


def test_the_variant_names_the_dtype_every_cpu_flag_and_the_thread_count():
    base = graph_variant("fp32", frozenset({"avx2", "fma"}), 2)
    assert graph_variant("fp32", frozenset({"fma", "avx2"}), 2) == base
    # Inductor builds for the CPU at hand (-march=native): any flag, not only those bgeserve picks kernels by.
    assert graph_variant("fp32", frozenset({"avx2", "fma", "gfni"}), 2) != base
    assert graph_variant("bf16", frozenset({"avx2", "fma"}), 2) != base
    # One thread compiles serial loops; another count bakes num_threads into them.
    assert graph_variant("fp32", frozenset({"avx2", "fma"}), 1) != base


def test_a_new_key_replaces_its_own_variant_and_leaves_other_machines_packages(model_dir, tmp_path):
    from bgeserve.cache_files import remove_other_keys

    ckpt = load_checkpoint(str(model_dir))
    here, there = graph_variant("fp32", frozenset({"avx2"}), 2), graph_variant("fp32", frozenset({"avx512f"}), 2)
    old, new = "a" * len(graph_key(ckpt)), graph_key(ckpt)
    for name in (f"{old}-{here}", f"{old}-{there}", f"{new}-{there}"):
        (tmp_path / name).mkdir()
    current = tmp_path / f"{new}-{here}"
    current.mkdir()
    remove_other_keys(current, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([current.name, f"{old}-{there}", f"{new}-{there}"])


def test_a_read_only_model_dir_keeps_its_graph_in_the_user_cache(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_files, "_writable_dir", lambda path: False)
    monkeypatch.setattr(query_graph, "default_cache_dir", lambda: tmp_path / "user-cache")
    ckpt = load_checkpoint(str(model_dir))
    location = query_graph.graph_location(ckpt, graph_key(ckpt), graph_variant("fp32"))
    assert location.is_relative_to(tmp_path / "user-cache")


def test_where_the_graph_does_not_apply_the_backend_runs_eagerly(model_dir, monkeypatch, caplog):
    # int8 on the per-tensor kernel (injected: the per-token one depends on the CPU's features).
    monkeypatch.setattr(torch_backend, "exact_int8_products", lambda: False)
    with caplog.at_level(logging.INFO, logger="bgeserve.runtime.torch_backend"):
        backend = TorchBackend(load_checkpoint(str(model_dir)), "cpu", BackendOptions(dtype="int8", query_graph=True))
    assert backend._query_graph is None
    assert "applies to fp32 and bf16 on the CPU only" in caplog.text
    assert backend.run([TEXTS[0]], DENSE)[0].dense.shape == (32,)


@needs_compiler
def test_graph_sizes_outside_the_compiled_range_take_the_eager_path(graphed_fp32, eager_fp32, counted):
    graph = counted.graph
    assert graph.fits(2) and graph.fits(graph.max_tokens)
    assert not graph.fits(1) and not graph.fits(graph.max_tokens + 1)
    # A one-token text (possible with max_length 1) is not one the graph was compiled for.
    got, = graphed_fp32.run([[0]], DENSE)
    assert counted.calls == 0
    np.testing.assert_allclose(got.dense, eager_fp32.run([[0]], DENSE)[0].dense, atol=1e-5)


@needs_compiler
def test_a_text_as_long_as_the_model_takes_runs_through_the_graph(graphed_fp32, eager_fp32, counted):
    limit = counted.graph.max_tokens
    text = [0, *[7 + i % 50 for i in range(limit - 2)], 2]
    for want in (DENSE, ALL):
        got, = graphed_fp32.run([text], want)
        ref, = eager_fp32.run([text], want)
        np.testing.assert_allclose(got.dense, ref.dense, atol=1e-5)
    assert counted.calls == 2


@needs_compiler
def test_a_mean_pooled_bert_model_through_the_graph_matches_eager(minilm_path, tmp_path, monkeypatch):
    """The bundled MiniLM: BERT positions, mean pooling (every row of the last layer), token embeddings."""
    monkeypatch.setattr(query_graph, "default_cache_dir", lambda: tmp_path / "aoti")
    ckpt = load_checkpoint(str(minilm_path))
    graphed = TorchBackend(ckpt, "cpu", BackendOptions(dtype="fp32", query_graph=True))
    eager = TorchBackend(ckpt, "cpu", BackendOptions(dtype="fp32"))
    assert graphed._query_graph is not None and graphed._query_graph.path.is_relative_to(tmp_path / "aoti")
    text = ckpt.tokenizer.encode(["how do I reset my password"], max_length=64).ids[0]
    tokens = OutputRequest(dense=True, token_embeddings=True)
    got, = graphed.run([text], tokens)
    ref, = eager.run([text], tokens)
    np.testing.assert_allclose(got.dense, ref.dense, atol=1e-5)
    np.testing.assert_allclose(got.token_embeddings, ref.token_embeddings, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "onnx", "query_graph": True}, "applies to the torch backend only"),
        ({"compile": True, "query_graph": True}, "not with --compile"),
    ],
)
def test_options_that_cannot_combine_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        BackendOptions(**options)


def test_serve_flag_and_environment_reach_the_backend_options():
    import argparse

    parser = argparse.ArgumentParser()
    ServeSettings.add_arguments(parser)
    flagged = ServeSettings.from_sources(parser.parse_args(["--query-graph"]), environ={})
    assert flagged.backend_options().query_graph
    from_env = ServeSettings.from_sources(parser.parse_args([]), environ={"BGESERVE_QUERY_GRAPH": "1"})
    assert from_env.backend_options().query_graph
    assert not ServeSettings.from_sources(parser.parse_args([]), environ={}).backend_options().query_graph


def test_bench_rows_name_the_query_graph():
    config = parse_config("cpu-bf16-qgraph-t2")
    assert (config.kind, config.dtype, config.threads, config.query_graph) == ("cpu", "bf16", 2, True)
    assert config.name == "cpu-bf16-qgraph-t2"
    for name in ("onnx-fp32-qgraph", "cpu-int8-qgraph", "cuda-bf16-qgraph"):
        with pytest.raises(ValueError, match="-qgraph applies"):
            parse_config(name)
