"""Test-only: make PyPI's CUDA-built torchvision wheel importable next to a CPU-only torch.

Used only by ``tests/test_processor_path.py``, which puts this folder and ``.ci/.torchvision`` (the wheel installed
``--no-deps`` there by ``.ci/install-torchvision``) on the ``PYTHONPATH`` of a *subprocess* that runs
``tests/processor_path_cases.py``. Python imports ``sitecustomize`` at startup; nothing here runs in the main
pytest process, and nothing is installed anywhere.

Why: transformers' ``Qwen2VLVideoProcessor`` needs torchvision. torchvision's compiled libraries (``_C.so``: nms,
roi_align, roi_pool, ps_roi_*, deform_conv2d; ``image.so``: the image decoders) are CUDA builds that do not load on
a CPU-only torch. torchvision tolerates that (``torchvision.extension._has_ops()`` is then False) except in one
place: ``torchvision/_meta_registrations.py`` calls ``torch.library.register_fake("torchvision::nms")`` (and
``"torchvision::qnms"``) unconditionally, and registering a fake kernel for an operator that was never defined
raises ``RuntimeError: operator torchvision::nms does not exist`` — so ``import torchvision`` fails, and with it
every transformers import that sees torchvision installed.

What is skipped: while ``torchvision/__init__.py`` runs (and only then), ``torch.library.register_fake`` and
``torch.library.register_autograd`` skip registrations for ``torchvision::<op>`` operators that do not exist
because their library did not load; the names go to :data:`SKIPPED`. Every other registration, and every call
after the import, goes to torch unchanged. The skipped ops stay unusable (calling one raises, as torchvision's own
``_assert_has_ops`` says). The video processor does not use them: it uses only torchvision's pure-PyTorch
transforms (resize, rescale, normalize) on tensors.

The patch is applied lazily, by an import hook, when something first imports torchvision — so the process starts
in the usual order (``tests/conftest.py`` sets its environment before torch, triton or torchvision load). A
``sitecustomize`` later on ``sys.path`` (site-wide) is still run after this one.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

SKIPPED: list = []  # "register_fake(torchvision::nms)", ... : what the import hook skipped


def _missing_torchvision_op(op) -> bool:
    if not isinstance(op, str) or not op.startswith("torchvision::"):
        return False
    import torch

    name = op.split("::", 1)[1].split(".", 1)[0]
    return not hasattr(torch.ops.torchvision, name)  # AttributeError: no such operator was defined


def _skipping(original):
    def register(op, *args, **kwargs):
        if not _missing_torchvision_op(op):
            return original(op, *args, **kwargs)
        SKIPPED.append(f"{original.__name__}({op})")
        if args and callable(args[0]):  # register_fake(op, fn) / register_autograd(op, backward, ...)
            return args[0]
        return lambda fn: fn  # decorator form: @register_fake(op)

    return register


class _PatchedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        import torch.library as lib

        saved = lib.register_fake, lib.register_autograd
        lib.register_fake, lib.register_autograd = _skipping(saved[0]), _skipping(saved[1])
        try:
            self._loader.exec_module(module)
        finally:
            lib.register_fake, lib.register_autograd = saved


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchedLoader(spec.loader)
        return spec


sys.meta_path.insert(0, _TorchvisionFinder())


def _run_next_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_run_next_sitecustomize()
