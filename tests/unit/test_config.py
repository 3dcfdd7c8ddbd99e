"""Configuration: TOML, then environment, then command line; validated when built."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.config import PoolConfig
from workers.errors import ConfigError
from workers.placement import Slot, default_cpu_workers, plan


def test_layers_override_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "pool.toml"
    toml.write_text(
        '[pool]\nmodel = "/m/resnet.keras"\nmax_batch_size = 16\nmax_latency_ms = 3\n'
        'devices = ["0", "1"]\n'
    )
    env = {"TFPOOL_MAX_BATCH_SIZE": "24", "TFPOOL_BUCKETS": "1,8,24", "TFPOOL_UNRELATED": "x"}
    config = PoolConfig.load(
        config_file=str(toml), env=env, overrides={"max_latency_ms": 7.5, "workers": None}
    )
    assert config.name == "resnet"
    assert config.max_batch_size == 24
    assert config.buckets == [1, 8, 24]
    assert config.max_latency_ms == 7.5
    assert config.devices == ["0", "1"]
    assert config.workers == "auto"


def test_every_option_is_documented_in_the_example_config() -> None:
    example = (Path(__file__).parents[2] / "configs" / "example.toml").read_text()
    for option in PoolConfig.__dataclass_fields__:
        assert f"{option} =" in example or f"# {option} =" in example, option


def test_example_config_loads() -> None:
    path = Path(__file__).parents[2] / "configs" / "example.toml"
    config = PoolConfig.load(config_file=str(path), env={})
    assert config.name == "mlp"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "model is required"),
        ({"model": "m.keras", "max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"model": "m.keras", "max_latency_ms": -1}, "max_latency_ms must be >= 0"),
        ({"model": "m.keras", "workers": "two"}, "workers must be 'auto' or a number"),
        ({"model": "m.keras", "workers": -1}, "workers must be 'auto' or a number"),
        ({"model": "m.keras", "workers": 1.5}, "not a valid"),
        ({"model": "m.keras", "bogus": 1}, r"unknown options: \['bogus'\]"),
        ({"model": "m.keras", "buckets": [1, 2]}, "must be >= 1 and reach"),
        ({"model": "m.keras", "name": "a:b"}, "may not contain"),
        ({"model": "m.keras", "max_rank": 0}, "max_rank"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        PoolConfig.load(env={}, overrides=overrides)


def test_cpu_placement_divides_the_cores() -> None:
    config = PoolConfig(model="m.keras")
    assert plan(config, gpus=[], cores=8) == [Slot(0, None, 4, 1), Slot(1, None, 4, 1)]
    assert plan(config, gpus=[], cores=2) == [Slot(0, None, 2, 1)]
    three = PoolConfig(model="m.keras", workers=3)
    assert [s.intra_op_threads for s in plan(three, gpus=[], cores=8)] == [2, 2, 2]
    assert default_cpu_workers(1) == 1


def test_workers_auto_or_a_number_from_toml_the_environment_and_the_command_line(
    tmp_path: Path,
) -> None:
    from workers.cli import _parser

    toml = tmp_path / "pool.toml"
    toml.write_text('model = "m.keras"\nworkers = "auto"\n')
    assert PoolConfig.load(config_file=str(toml), env={}).workers == "auto"
    toml.write_text('model = "m.keras"\nworkers = 3\n')
    assert PoolConfig.load(config_file=str(toml), env={}).workers == 3
    assert (
        PoolConfig.load(env={"TFPOOL_WORKERS": "AUTO"}, overrides={"model": "m"}).workers == "auto"
    )
    assert PoolConfig.load(env={"TFPOOL_WORKERS": "2"}, overrides={"model": "m"}).workers == 2
    for given, expected in (("auto", "auto"), ("4", 4)):
        args = _parser().parse_args(["serve", "--model", "m.keras", "--workers", given])
        assert (
            PoolConfig.load(env={}, overrides={"model": "m", "workers": args.workers}).workers
            == expected
        )


def test_workers_auto_with_intra_op_threads_fills_the_cores_with_such_workers() -> None:
    config = PoolConfig(model="m.keras", intra_op_threads=2)
    assert plan(config, gpus=[], cores=8) == [Slot(i, None, 2, 1) for i in range(4)]
    fixed = PoolConfig(model="m.keras", intra_op_threads=2, workers=0)  # as before auto
    assert plan(fixed, gpus=[], cores=8) == [Slot(i, None, 2, 1) for i in range(2)]


def test_gpu_placement_one_worker_per_device_or_more() -> None:
    config = PoolConfig(model="m.keras")
    slots = plan(config, gpus=["0", "1", "3"], cores=12)
    assert [s.device for s in slots] == ["0", "1", "3"]
    assert all(s.intra_op_threads == 4 for s in slots)
    two_each = PoolConfig(model="m.keras", workers_per_device=2, devices=["5", "6"])
    assert [s.device for s in plan(two_each, gpus=[], cores=8)] == ["5", "6", "5", "6"]


def test_tables_from_toml_the_environment_and_the_command_line(tmp_path: Path) -> None:
    toml = tmp_path / "pool.toml"
    toml.write_text(
        '[pool]\nmodel = "graph.pb"\n[pool.graph_inputs]\nx = "x:0"\n'
        '[pool.graph_outputs]\nprobs = "probs:0"\n'
    )
    config = PoolConfig.load(config_file=str(toml), env={})
    assert (config.graph_inputs, config.graph_outputs) == ({"x": "x:0"}, {"probs": "probs:0"})
    assert config.name == "graph"
    env = {"TFPOOL_GRAPH_INPUTS": '{"x": "input:0"}', "TFPOOL_CONVERT_INPUTS": "false"}
    config = PoolConfig.load(config_file=str(toml), env=env)
    assert config.graph_inputs == {"x": "input:0"} and config.convert_inputs is False
    config = PoolConfig.load(
        config_file=str(toml), env={}, overrides={"input_signature": '{"x": "float32 [*, 4]"}'}
    )
    assert config.input_signature == {"x": "float32 [*, 4]"}
    with pytest.raises(ConfigError, match="option graph_inputs"):
        PoolConfig.load(config_file=str(toml), env={"TFPOOL_GRAPH_INPUTS": "x=x:0"})


def test_a_builder_is_named_after_its_function() -> None:
    config = PoolConfig(model="mypkg.models:build_model", checkpoint="ckpts/")
    assert config.name == "build_model"
    with pytest.raises(ConfigError, match="batching must be 'on' or 'off'"):
        PoolConfig(model="m.keras", batching="sometimes")


def test_relative_paths_in_a_config_file_are_taken_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deploy"
    folder.mkdir()
    (folder / "labels.txt").write_text("cat\ndog\n")
    (folder / "pool.toml").write_text(
        '[pool]\nmodel = "models/pets.keras"\nlabels_file = "labels.txt"\n'
    )
    monkeypatch.chdir(tmp_path)  # run from elsewhere, with a relative --config too
    config = PoolConfig.load(config_file="deploy/pool.toml", env={})
    assert config.model == str(folder / "models" / "pets.keras")
    assert config.labels_file == str(folder / "labels.txt")
    # The command line's paths stay as given: relative to where the command runs.
    given = PoolConfig.load(config_file="deploy/pool.toml", env={}, overrides={"model": "m.h5"})
    assert given.model == "m.h5"


def test_describe_slots_says_when_no_gpu_was_found() -> None:
    from workers.placement import describe_slots

    assert describe_slots([Slot(0, None, 2, 1)]) == "no GPU found: 1 CPU worker"
    assert describe_slots([Slot(i, None, 1, 1) for i in range(2)]) == "no GPU found: 2 CPU workers"
    assert describe_slots([Slot(0, "0", 1, 0), Slot(1, "1", 1, 0)]) == "GPUs 0, 1: 2 workers"


def test_metrics_options_from_the_environment_and_the_command_line() -> None:
    assert PoolConfig(model="m.keras").metrics_port == -1  # no endpoint unless asked
    env = {"TFPOOL_METRICS_PORT": "0", "TFPOOL_METRICS": "false"}
    config = PoolConfig.load(env=env, overrides={"model": "m.keras"})
    assert config.metrics_port == 0 and config.metrics is False
    from workers.cli import _parser

    args = _parser().parse_args(["serve", "--model", "m.keras", "--metrics-port", "9100"])
    assert args.metrics_port == 9100
    # An option on by default can be turned off on the command line too.
    args = _parser().parse_args(["serve", "--model", "m.keras", "--no-metrics"])
    assert args.metrics is False
    assert _parser().parse_args(["serve", "--model", "m.keras"]).metrics is None  # unset
    with pytest.raises(ConfigError, match="metrics_port"):
        PoolConfig(model="m.keras", metrics_port=70000)
