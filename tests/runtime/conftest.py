"""Fixtures shared by the runtime tests."""

import pytest

from vspec.testing import perturbed_copy, tiny_pair


@pytest.fixture(scope="module")
def models():
    """Per family: the tiny target and a close draft (a perturbed copy: partial acceptance, rollback, per-row
    lengths). test_engine.py and test_loose.py override this with their own drafts."""
    return {fam: (target, perturbed_copy(target, noise=0.1, seed=1))
            for fam, (target, _) in ((f, tiny_pair(f)) for f in ("qwen2_5_vl", "llava_onevision"))}



@pytest.fixture(autouse=True)
def _reference_ops_outside_kernel_tests(request, monkeypatch):
    """A test module with ``KERNEL_TESTS`` runs only those tests through the Triton kernels (the CPU interpreter is
    slow per launch); its other tests use the reference ops, which the kernels equal (tests/kernels/)."""
    kernel_tests = getattr(request.module, "KERNEL_TESTS", None)
    if kernel_tests is not None and request.node.originalname not in kernel_tests:
        monkeypatch.setenv("VSPEC_BACKEND", "reference")
