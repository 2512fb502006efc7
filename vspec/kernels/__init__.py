"""Triton kernels, one op family per file, and the PyTorch reference (:mod:`vspec.kernels.reference`).

Importing this package never imports triton; the family modules do, and only :mod:`vspec.ops` loads them.
"""
