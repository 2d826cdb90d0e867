"""Process-group options: the NCCL stream priority switch reads its environment strictly."""

import pytest

from moepatch.parallel.distributed import PRIORITY_ENV, default_high_priority


@pytest.mark.parametrize("value, expected", [(None, True), ("1", True), ("on", True), ("0", False),
                                             ("false", False), (" No ", False)])
def test_priority_switch_reads_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(PRIORITY_ENV, raising=False)
    else:
        monkeypatch.setenv(PRIORITY_ENV, value)
    assert default_high_priority() is expected


def test_bad_priority_value_names_what_is_accepted(monkeypatch):
    monkeypatch.setenv(PRIORITY_ENV, "fast")
    with pytest.raises(ValueError, match=r"MOEPATCH_NCCL_HIGH_PRIORITY='fast'.*accepted: 1/0"):
        default_high_priority()
