"""Triton kernels, one op family per file, and the PyTorch reference (:mod:`vspec.kernels.reference`).

Importing this package never imports triton; the family modules do, and only :mod:`vspec.ops` loads them.
"""

from __future__ import annotations

import os

#: Largest tree (nodes, root included) ``vspec.ops.verify_tree_greedy`` accepts: the tree kernel runs one tree
#: in one program of ``next_power_of_2(N)`` lanes, and the compile test (tests/kernels/test_compile.py) keeps
#: every tree variant up to this size free of register spills on sm_90. The reference obeys the same limit so
#: that a configuration behaves alike on every backend.
MAX_TREE_NODES = 256


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter, read the way the installed Triton reads it.

    Triton >= 3.4 parses ``TRITON_INTERPRET`` through ``triton.knobs`` (``1``/``true``/``on``/``yes``, any case);
    older releases, which have no knobs, compare the variable with ``"1"``. Without triton: False.
    """
    try:
        from triton import knobs
    except ImportError:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)
