"""Fixtures shared by the runtime tests."""

import pytest

from vspec.testing import perturbed_copy, tiny_pair


@pytest.fixture(scope="module")
def models():
    """Per family: the tiny target and a close draft (a perturbed copy: partial acceptance, rollback, per-row
    lengths). test_engine.py and test_loose.py override this with their own drafts."""
    return {fam: (target, perturbed_copy(target, noise=0.1, seed=1))
            for fam, (target, _) in ((f, tiny_pair(f)) for f in ("qwen2_5_vl", "llava_onevision"))}
