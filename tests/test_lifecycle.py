"""The lifecycle base every resource owner shares (pydmabuf._lifecycle)."""

from __future__ import annotations

import gc

import pytest

from pydmabuf._lifecycle import Owner


class _Slot(Owner):
    def __init__(self, fail: bool = False) -> None:
        if fail:
            raise ValueError("refused")
        self.held = True
        self.closes = 0

    def _owns(self) -> bool:
        return self.held

    def close(self) -> None:
        if self.held:
            self.closes += 1
        self.held = False


def test_with_closes_once_even_if_the_block_closed_by_hand() -> None:
    with _Slot() as s:
        s.close()
    assert s.closes == 1 and not s.held
    with _Slot() as t:
        assert t.held
    assert t.closes == 1


def test_with_closes_when_the_block_raises() -> None:
    with pytest.raises(KeyError), _Slot() as s:
        raise KeyError("x")
    assert not s.held


def test_collected_while_owning_warns_resource_warning() -> None:
    s = _Slot()
    with pytest.warns(ResourceWarning, match="collected without close"):
        del s
        gc.collect()


def test_collected_after_close_is_silent() -> None:
    s = _Slot()
    s.close()
    del s
    gc.collect()  # warnings are errors under the suite's config


def test_half_constructed_owner_is_silent() -> None:
    with pytest.raises(ValueError):
        _Slot(fail=True)
    gc.collect()
