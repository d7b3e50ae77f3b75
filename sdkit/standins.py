"""Stand-ins for model modules' `forward` for the length of a run (DeepCache, token merging), each put back as it was.

An instance attribute `forward` shadows the class's method, so the module's own `__call__`, hooks and callers stay
as PyTorch and diffusers run them. Putting back the attribute that was there before (not deleting it) lets two
stand-ins on one module nest.
"""

from __future__ import annotations

from collections.abc import Callable


class StandIns:
    """Replace modules' forwards with `make(original_forward)`; `restore()` puts each back, last first."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, Callable | None]] = []

    def replace(self, module, make: Callable[[Callable], Callable]) -> None:
        """module.forward becomes make(module.forward) until restore()."""
        self._saved.append((module, module.__dict__.get("forward")))
        module.forward = make(module.forward)

    def restore(self) -> None:
        """Every replaced forward back as it was before replace()."""
        for module, earlier in reversed(self._saved):
            if earlier is None:
                del module.forward
            else:
                module.forward = earlier
        self._saved.clear()
