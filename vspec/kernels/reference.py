"""Pure-PyTorch reference of every vspec op: the specification.

Readable, vectorised PyTorch computing in float32/float64 internally. Tests compare the Triton kernels with
these functions; benchmarks use them as the eager provider. Argument checks live in :mod:`vspec.ops`.
"""

from __future__ import annotations

import torch
