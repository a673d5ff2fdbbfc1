"""One lifecycle for every Python object that owns a resource of the model.

A buffer reference, an attachment, a CPU mapping, an IOVA reservation, a
device file, an IOAS: each owns something that must be given back, and each
gives it back the same three ways.

- :meth:`Owner.close` gives it back; calling it again does nothing.
- ``with obj:`` closes on the way out, unless the block already did.
- An owner collected while it still owns something warns with a
  :class:`ResourceWarning` (shown by ``python -X dev`` and by the tests,
  which turn warnings into errors), as an unclosed file does.

A subclass says what it owns (:meth:`Owner._owns`), how to give it back
(:meth:`Owner.close`) and, optionally, what the warning says. A verb the
kernel uses (``put``, ``detach``, ``destroy``) stays the documented name;
``close`` is the same action under the name Python code reaches for.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

__all__ = ["Owner"]

_O = TypeVar("_O", bound="Owner")


class Owner:
    """Base of the classes that own a resource of the model.

    Examples
    --------
    >>> class Slot(Owner):
    ...     def __init__(self) -> None:
    ...         self.held = True
    ...     def _owns(self) -> bool:
    ...         return self.held
    ...     def close(self) -> None:
    ...         self.held = False
    >>> with Slot() as s:
    ...     s.held
    True
    >>> s.held
    False
    """

    __slots__ = ()

    def _owns(self) -> bool:
        """Whether this object still holds what it must give back."""
        raise NotImplementedError

    def close(self) -> None:
        """Give back what this object owns; idempotent."""
        raise NotImplementedError

    def _leak_message(self) -> str:
        """The ResourceWarning's text when collected while still owning."""
        return f"{self!r} collected without close()"

    def __enter__(self: _O) -> _O:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owns():  # the block may already have closed it by hand
            self.close()

    def __del__(self) -> None:
        try:
            owns = self._owns()
        except AttributeError:  # __init__ raised before the state existed
            return
        if owns:
            warnings.warn(self._leak_message(), ResourceWarning, stacklevel=2)
