"""Which version's fields an address reads from a model's info hash."""

from __future__ import annotations

from queueing.model_info import version_of


def test_an_address_names_a_version_by_number_or_label() -> None:
    labels = b"stable=3, canary=4"
    assert version_of("resnet", labels) is None  # the default version's plain fields
    assert version_of("resnet@2", labels) == 2
    assert version_of("resnet@canary", labels) == 4
    assert version_of("resnet@stable", "stable=3") == 3
    assert version_of("resnet@beta", labels) is None  # no such label: the default's
    assert version_of("resnet@canary", None) is None
