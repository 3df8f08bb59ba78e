"""The Serve application builder's arguments, its deployment options, and the configs Serve builds from it.

No cluster here: `serve run` / `serve deploy` hand the builder these arguments; Ray's own functions
check what it returns.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app
from ray.serve.schema import ServeDeploySchema

from bgeserve.api.settings import ServeSettings, SettingsError
from bgeserve.ray.commands import corpus_job_options, parse_concurrency, parse_key_values
from bgeserve.ray.options import ONGOING_HEADROOM, RayServeOptions
from bgeserve.ray.serve_app import proxy_http_options


def test_serve_run_strings_map_onto_settings_and_deployment():
    options = RayServeOptions.from_args({
        "model": "/models/bge-m3", "num_replicas": "4", "max_concurrent_requests": "64",
        "api_key": "k", "auto_truncate": "false", "dtype": "fp16",
    })
    assert options.settings.model == "/models/bge-m3"
    assert options.settings.api_key == "k" and options.settings.auto_truncate is False
    deployment = options.deployment_options()
    assert deployment["num_replicas"] == 4 and "autoscaling_config" not in deployment
    # The replica's own slots answer 429 before Serve's request limit holds anything back.
    assert deployment["max_ongoing_requests"] == 64 + ONGOING_HEADROOM
    assert deployment["max_queued_requests"] == 64 + ONGOING_HEADROOM
    assert deployment["backpressure_config"] == {"status_code": 429, "retry_after_s": 1}
    assert deployment["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_yaml_values_from_a_config_file_parse_too():
    options = RayServeOptions.from_args({"num_replicas": 2, "auto_truncate": False, "max_batch_tokens": 4096,
                                         "num_cpus_per_replica": 4})
    assert options.settings.auto_truncate is False and options.settings.max_batch_tokens == 4096
    # A CPU replica runs as many torch threads as Ray reserves CPUs for it, on the CPU alone.
    replica = options.replica_settings()
    assert (replica.devices, replica.threads, replica.replicas_per_device) == ("cpu", 4, 1)
    assert options.deployment_options()["ray_actor_options"]["num_cpus"] == 4


def test_serve_ray_proxy_listens_where_serve_would_and_bounds_a_request_by_its_timeout():
    from ray.serve.config import HTTPOptions

    bounded = HTTPOptions(**proxy_http_options(ServeSettings(host="0.0.0.0", port=9000, request_timeout=45,
                                                             timeout_keep_alive=7.4)))
    assert (bounded.host, bounded.port, bounded.request_timeout_s, bounded.keep_alive_timeout_s) == (
        "0.0.0.0", 9000, 45, 7)
    # Without --request-timeout, Serve's own default (no limit) stays.
    assert HTTPOptions(**proxy_http_options(ServeSettings())).request_timeout_s is None


def test_gpu_replicas_take_one_gpu_each_and_see_it_as_cuda0():
    options = RayServeOptions.from_args({"num_gpus_per_replica": "1", "num_replicas": "4"})
    assert options.replica_settings().devices == "cuda:0"
    assert options.deployment_options()["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_autoscaling_from_min_and_max_or_auto():
    scaled = RayServeOptions.from_args({"min_replicas": "1", "max_replicas": "8", "target_ongoing_requests": "32"})
    deployment = scaled.deployment_options()
    assert "num_replicas" not in deployment
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 32}
    auto = RayServeOptions.from_args({"num_replicas": "auto", "max_replicas": "3"}).deployment_options()
    assert auto["autoscaling_config"]["min_replicas"] == 1 and auto["autoscaling_config"]["max_replicas"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"num_replica": "2"}, "unknown argument(s) num_replica"),
        ({"num_replicas": "2", "max_replicas": "4"}, "not both"),
        ({"min_replicas": "5", "max_replicas": "4"}, "above max_replicas"),
        ({"num_replicas": "two"}, "num_replicas='two' is not a valid int"),
        ({"max_concurrent_requests": "0"}, "--max-concurrent-requests must be at least 1"),
        ({"api_key": ""}, "--api-key"),
    ],
)
def test_bad_arguments_say_what_is_wrong(args, message):
    with pytest.raises(SettingsError, match=None) as caught:
        RayServeOptions.from_args(args)
    assert message in str(caught.value)


def test_config_file_args_go_through_serve_own_builder_call():
    """What `serve deploy` / `serve run config.yaml` do with `import_path: bgeserve.ray:app` and `args:`."""
    config = ServeDeploySchema.model_validate({
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [{
            "name": "bgeserve", "route_prefix": "/", "import_path": "bgeserve.ray:app",
            "args": {"model": "/models/bge-m3", "num_replicas": 3, "num_gpus_per_replica": 1},
        }],
    })
    from bgeserve.ray import app

    application = call_user_app_builder_with_args_if_necessary(app, config.applications[0].args)
    (deployment,) = build_app(application, name="bgeserve").deployments
    assert deployment.name == "bgeserve" and deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_gpus"] == 1
    settings = deployment.init_args[0]
    assert settings.model == "/models/bge-m3" and settings.devices == "cuda:0"


def test_serve_build_writes_a_config_serve_accepts(tmp_path: Path):
    """`serve build` takes a built application, so the environment-configured one is what it reads."""
    out = tmp_path / "serve.yaml"
    env = {**os.environ, "BGESERVE_MODEL": "/models/bge-m3", "BGESERVE_NUM_REPLICAS": "3",
           "BGESERVE_MAX_CONCURRENT_REQUESTS": "128"}
    serve_cli = Path(sys.executable).with_name("serve")
    proc = subprocess.run([str(serve_cli), "build", "bgeserve.ray:app_from_env", "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "bgeserve.ray:app_from_env"
    (deployment,) = application["deployments"]
    assert deployment["name"] == "bgeserve" and deployment["num_replicas"] == 3
    assert deployment["max_ongoing_requests"] == 128 + ONGOING_HEADROOM


def test_cli_flag_parsing():
    assert parse_key_values(["num_replicas=4", "api_key=a=b"]) == {"num_replicas": "4", "api_key": "a=b"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_key_values(["num_replicas"])
    assert parse_concurrency("4") == 4 and parse_concurrency("2,8") == (2, 8)
    with pytest.raises(ValueError, match="MIN,MAX"):
        parse_concurrency("x")


def test_encode_flags_become_job_options():
    from bgeserve.ray.commands import add_encode_arguments

    parser = argparse.ArgumentParser()
    for flag in ("--model", "--max-length", "--dtype", "--threads"):
        parser.add_argument(flag)
    parser.add_argument("--input", default="-")  # as `bgeserve encode` has them
    parser.add_argument("--output", default="-")
    for flag in ("--no-dense", "--sparse", "--colbert", "--no-progress"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    add_encode_arguments(parser)
    args = parser.parse_args(["--ray", "--input", "data/*.parquet", "--output", "out", "--sparse",
                              "--concurrency", "2,4", "--num-gpus", "1", "--id-column", "doc_id"])
    options = corpus_job_options(args)
    assert options["concurrency"] == (2, 4) and options["num_gpus"] == 1 and options["sparse"]
    assert options["id_column"] == "doc_id" and options["dense"] and not options["colbert"]
    with pytest.raises(ValueError, match="--input GLOB"):
        corpus_job_options(parser.parse_args(["--ray", "--output", "out"]))


README = Path(__file__).resolve().parents[2] / "README.md"


def _ray_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Scale out on Ray")
    return text[start: text.index("\n## ", start + 1)]


def _bash_commands(section: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            line = re.sub(r"^(export\s+)?(\w+=\S+\s+)+", "", line)  # VAR=value command ...
            if line:
                commands.append(line)
    return commands


def test_readme_serve_run_lines_are_valid_builder_arguments():
    lines = [c for c in _bash_commands(_ray_section()) if c.startswith("serve run")]
    assert len(lines) >= 3
    for line in lines:
        words = shlex.split(line)
        RayServeOptions.from_args(parse_key_values([w for w in words if "=" in w and not w.startswith("-")]))


def _parse_bgeserve(line: str) -> argparse.Namespace:
    """A documented `bgeserve serve|encode --ray ...` line through the parsers, the Ray flags added as the
    CLI adds them."""
    from bgeserve.cli import encode as encode_command
    from bgeserve.cli import serve as command
    from bgeserve.ray.commands import add_encode_arguments, add_serve_arguments

    sub = argparse.ArgumentParser(prog="bgeserve", exit_on_error=False).add_subparsers()
    command.register(sub)
    encode_command.register(sub)
    for name, add in (("serve", add_serve_arguments), ("encode", add_encode_arguments)):
        if "--ray" not in sub.choices[name]._option_string_actions:
            add(sub.choices[name])
    words = [w for w in shlex.split(line) if not (w.startswith("[") or w.endswith("]"))]  # [optional] flags
    args = sub.choices[words[1]].parse_args(words[2:])
    for pair in getattr(args, "ray_arg", []):
        RayServeOptions.from_args(parse_key_values([pair]))
    return args


def test_readme_bgeserve_command_lines_parse():
    lines = [c for c in _bash_commands(_ray_section()) if c.startswith(("bgeserve serve", "bgeserve encode"))]
    assert len(lines) >= 3
    for line in lines:
        assert _parse_bgeserve(line).ray


def test_readme_configs_are_ones_serve_accepts():
    serve_block, kuberay_block = re.findall(r"```yaml\n(.*?)```", _ray_section(), flags=re.S)
    serve_config = yaml.safe_load(serve_block)
    kinds = {doc["kind"]: doc for doc in yaml.safe_load_all(kuberay_block)}
    assert set(kinds) == {"RayService", "RayJob"}
    service = kinds["RayService"]
    assert _parse_bgeserve(kinds["RayJob"]["spec"]["entrypoint"]).ray
    for config in (serve_config, yaml.safe_load(service["spec"]["serveConfigV2"])):
        schema = ServeDeploySchema.model_validate(config)
        (application,) = schema.applications
        assert application.import_path == "bgeserve.ray:app" and application.route_prefix == "/"
        RayServeOptions.from_args(application.args)


def test_corpus_job_refuses_a_max_length_below_the_models_shortest_input(m3_checkpoint, tmp_path):
    """Checked against the model's own special tokens before any Ray work starts (no cluster here)."""
    from bgeserve.ray.corpus_job import CorpusJob, CorpusJobOptions

    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="max_length must be at least 3 for this model"):
        CorpusJob(CorpusJobOptions(model=str(m3_checkpoint), max_length=2)).run(
            str(tmp_path / "in.jsonl"), tmp_path / "out"
        )
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        CorpusJobOptions(model=str(m3_checkpoint), max_length=0)
    assert not (tmp_path / "out").exists()
