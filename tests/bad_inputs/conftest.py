"""Shared by the bad-input tables: a guard that fails a test whose error comes after a weight
was read."""

import pytest

from dsjax import sources


@pytest.fixture()
def no_weights(monkeypatch):
    """Any weight read fails the test: the error must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")
    for kind in (sources.HFSource, sources.CheckpointSource, sources.RandomSource):
        monkeypatch.setattr(kind, "load", refuse)
