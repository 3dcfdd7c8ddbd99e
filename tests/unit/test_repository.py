"""The model repository's pure parts: which folders are complete versions, which versions
a policy serves, addresses with versions, and results that name their version."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from queueing import keys, wire
from workers.config import PoolConfig
from workers.errors import ConfigError
from workers.messages import Received
from workers.repository import READY_MARKER, ModelWatch, VersionPolicy, parse_labels
from workers.runner import Served
from workers.spec import TensorSpec
from workers.versions import Version, Versions


def write_version(folder: Path, data: bytes = b"weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.keras").write_bytes(data)
    return folder


def test_a_version_is_complete_once_unchanged_across_two_scans(tmp_path: Path) -> None:
    watch = ModelWatch(tmp_path)
    write_version(tmp_path / "1")
    assert watch.scan() == []  # seen once: perhaps still being copied
    assert [c.number for c in watch.scan()] == [1]


def test_a_version_still_being_written_is_not_taken(tmp_path: Path) -> None:
    watch = ModelWatch(tmp_path)
    folder = write_version(tmp_path / "2", b"part")
    for size in range(5):  # the copy goes on between scans: never complete
        assert watch.scan() == []
        with open(folder / "model.keras", "ab") as f:
            f.write(b"x" * (size + 1))
    assert watch.scan() == []  # sees the last write
    assert [c.number for c in watch.scan()] == [2]  # the copy has stopped


def test_a_ready_marker_makes_a_version_complete_at_once(tmp_path: Path) -> None:
    watch = ModelWatch(tmp_path)
    folder = write_version(tmp_path / "3")
    (folder / READY_MARKER).touch()
    (candidate,) = watch.scan()
    assert candidate.number == 3
    assert candidate.path == str(folder / "model.keras")


def test_only_model_folders_with_a_model_are_versions(tmp_path: Path) -> None:
    watch = ModelWatch(tmp_path)
    write_version(tmp_path / "tmp")  # not a number: a staging folder
    write_version(tmp_path / "0")  # versions start at 1
    (tmp_path / "4").mkdir()  # nothing in it yet
    saved = tmp_path / "5"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"graph")
    watch.scan()
    assert [(c.number, c.path) for c in watch.scan()] == [(5, str(saved))]


@pytest.mark.parametrize(
    ("policy", "chosen"),
    [
        ("latest", [4]),
        ("latest:2", [3, 4]),
        ("all", [1, 3, 4]),
        ("specific:1,3", [1, 3]),
        ("specific:2", []),
        ("[3, 9]", [3]),
    ],
)
def test_version_policies_choose_as_tf_serving_does(policy: str, chosen: list[int]) -> None:
    assert VersionPolicy.parse(policy).select([4, 1, 3]) == chosen


@pytest.mark.parametrize("policy", ["newest", "latest:0", "specific:", "specific:a", "all:2"])
def test_bad_version_policies_are_refused(policy: str) -> None:
    with pytest.raises(ConfigError, match="version"):
        VersionPolicy.parse(policy)


def test_labels_name_versions_and_are_not_numbers() -> None:
    assert parse_labels({"stable": "3", "canary": 4}) == {"stable": 3, "canary": 4}
    with pytest.raises(ConfigError, match="not a number"):
        parse_labels({"4": 3})


def test_repository_config_and_per_model_tables(tmp_path: Path) -> None:
    toml = tmp_path / "pool.toml"
    toml.write_text(
        '[pool]\nmodel_repo = "repo"\nmax_batch_size = 16\n\n'
        "[models.resnet]\nmax_batch_size = 64\nversion_policy = [3, 4]\n"
        "labels = { stable = 3, canary = 4 }\n"
    )
    config = PoolConfig.load(config_file=str(toml), env={})
    assert config.model_repo == str(tmp_path / "repo")
    resnet = config.for_model("resnet", "/m/resnet/3/model.keras")
    assert (resnet.name, resnet.max_batch_size, resnet.version_policy) == (
        "resnet",
        64,
        "specific:3,4",
    )
    assert resnet.labels == {"stable": "3", "canary": "4"}
    other = config.for_model("other", "/m/other/1/model.keras")
    assert (other.max_batch_size, other.version_policy) == (16, "latest")
    with pytest.raises(ConfigError, match="cannot be set per model"):
        PoolConfig(model_repo="repo", models={"a": {"workers": 2}})
    with pytest.raises(ConfigError, match="not both"):
        PoolConfig(model="m.keras", model_repo="repo")
    with pytest.raises(ConfigError, match="may not contain"):
        PoolConfig(model="m.keras", name="m@2")


def test_an_address_with_a_version_uses_its_model_s_queue() -> None:
    assert keys.split_address("resnet@canary") == ("resnet", "canary")
    assert keys.split_address("resnet") == ("resnet", None)
    assert keys.stream("resnet@4") == keys.stream("resnet")
    assert keys.model_info("resnet@4") == keys.model_info("resnet")


def test_a_result_says_which_version_made_it() -> None:
    outputs = np.arange(3, dtype=np.float32)
    assert wire.decode_result(wire.encode_result("r1", outputs, 4)).version == 4
    assert wire.decode_result(wire.encode_result("r1", outputs)).version is None


def _version(number: int) -> Version:
    # Routing and draining never touch the model, intake or runner.
    return Version(number, f"/m/{number}", cast(Any, None), cast(Any, None), cast(Any, None))


def _requests(*addresses: str) -> list[Received]:
    return [
        Received(b"%d-0" % i, f"r{i}", "reply", wire.RequestBody(a, np.zeros(1), None, 0), {})
        for i, a in enumerate(addresses)
    ]


def _routed(versions: Versions, *addresses: str) -> dict[int, int]:
    routed, unknown = versions.route(_requests(*addresses))
    assert unknown == []
    return {version.number: len(group) for version, group in routed}


def test_requests_go_to_the_default_a_pinned_version_or_a_label() -> None:
    versions = Versions("m", {"stable": 3, "canary": 4})
    for number in (3, 4, 5):
        versions.add(_version(number))
    assert _routed(versions, "m", "m@stable") == {3: 2}  # the default is "stable"
    assert _routed(versions, "m@4", "m@canary", "m@5") == {4: 2, 5: 1}
    routed, unknown = versions.route(_requests("m@7", "m@beta"))
    assert routed == []
    assert [str(e) for _, e in unknown] == [
        "model 'm': version '7' is not served; served versions: 3, 4, 5;"
        " labels: canary=4, stable=3",
        "model 'm': version 'beta' is not served; served versions: 3, 4, 5;"
        " labels: canary=4, stable=3",
    ]
    versions.retire(3)  # "stable" names a version no longer served: the newest is default
    assert versions.default_number() == 5


def test_a_retired_version_answers_what_it_holds_then_is_dropped() -> None:
    versions = Versions("m")
    versions.add(_version(1))
    assert _routed(versions, "m", "m", "m@1") == {1: 3}
    versions.add(_version(2))
    versions.retire(1)
    assert _routed(versions, "m") == {2: 1}  # new requests go to the new version at once
    assert versions.describe() == "1 draining; 2 ready"
    assert versions.get(1).number == 1  # still there to run what it holds
    versions.answered(Counter({1: 2}))
    assert versions.describe() == "1 draining; 2 ready"
    versions.answered(Counter({1: 1}))  # its last request answered: dropped
    assert versions.describe() == "2 ready"
    with pytest.raises(KeyError):
        versions.get(1)


def _described(number: int, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Version:
    # What describing a version reads of its LoadedModel (which needs TensorFlow): its
    # input and output specs.
    model = SimpleNamespace(inputs=inputs, outputs=outputs)
    served = Served(cast(Any, model), None, None, [s.name for s in outputs], cast(Any, None))
    return Version(number, f"/m/{number}", served, cast(Any, None), cast(Any, None))


def test_the_info_hash_gives_each_served_version_s_inputs_and_outputs() -> None:
    versions = Versions("m", {"stable": 1})
    versions.add(_described(1, [TensorSpec("x", "float32", (4,))],
                            [TensorSpec("y", "float32", (4,))]))  # fmt: skip
    versions.add(_described(2, [TensorSpec("features", "float64", (6,))],
                            [TensorSpec("total", "float64", (1,)),
                             TensorSpec("doubled", "float64", (6,))]))  # fmt: skip
    v1 = {"inputs": "x: float32 [*, 4]", "outputs": "y", "output_specs": "y: float32 [*, 4]"}
    v2 = {
        "inputs": "features: float64 [*, 6]",
        "outputs": "total, doubled",
        "output_specs": "total: float64 [*, 1], doubled: float64 [*, 6]",
    }
    assert versions.model_info(100) == {
        "max_queue": 100,
        "versions": "1, 2",
        "labels": "stable=1",
        "default_version": 1,
        **v1,  # the plain fields are the default version's, as before
        **{f"{field}@1": value for field, value in v1.items()},
        **{f"{field}@2": value for field, value in v2.items()},
    }
    assert all(keys.is_version_field(f"{field}@2") for field in v2)
    assert not keys.is_version_field("inputs") and not keys.is_version_field("a@b")

    versions.retire(1)  # the default is now 2; version 1's fields are gone
    assert versions.model_info(100) == {
        "max_queue": 100,
        "versions": "2",
        "labels": "stable=1",
        "default_version": 2,
        **v2,
        **{f"{field}@2": value for field, value in v2.items()},
    }
