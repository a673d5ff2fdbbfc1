"""Stubs for the compiled unit-cost loops (src/_calibrate.pyx)."""

def measure(
    rounds: int = ...,
    walks: int = ...,
    entries: int = ...,
    allocs: int = ...,
    tree_ops: int = ...,
    tree_live: int = ...,
) -> dict[str, list[float]]: ...
