"""Device placement for sharded targets (accelerate ``device_map``) and a draft on a device of its own.

A target loaded with ``from_pretrained(..., device_map=...)`` (or passed through ``accelerate.dispatch_model``)
carries accelerate's hooks: each mapped module moves its inputs to its own execution device, offloaded modules
("cpu"/"disk" next to a GPU) load their weights for the duration of their forward, and the top-level hook returns
the outputs to the device of the inputs. So the runtime keeps ALL of its own tensors (masks, positions, tokens,
logits, scores) on one *main* device — the device of the target's input embeddings — and only the tensors it
takes out of the model's internals are per layer: KV-cache layers live on their decoder layer's device, and the
score capture sees each layer's q/k on that layer's device.

``model.device`` is no guide on such a model: it is the device of the first parameter, which is ``meta`` when
that module is offloaded. :func:`input_device` asks the input embeddings instead.

A draft on another device than the target: the parallel schedule moves tokens across itself
(:mod:`vspec.runtime.parallel`); the serial schedules get :func:`vspec.runtime.parallel.draft_state`, a draft
state that takes main-side tensors, runs on the draft's device and hands its logits and cache extents back on the
main device.
"""

from __future__ import annotations

import contextlib

import torch


def _hook_device(module) -> torch.device | None:
    """The execution device of accelerate's hook on ``module`` (None without one)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one hook
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    return None


def _as_device(dev) -> torch.device:
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def input_device(model) -> torch.device:
    """The device ``model`` takes its input tensors on: where its input embeddings run.

    Plain models: the embedding weight's device (= ``model.device``). Accelerate-dispatched models: the same
    when the embeddings sit on a device; when they are offloaded (weight on ``meta``), their hook's execution
    device, else the top-level hook's (accelerate's main device).
    """
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    for module in (emb, model):
        dev = _hook_device(module)
        if dev is not None:
            return dev
    return model.device


def on_device(device: torch.device):
    """Make ``device`` the current CUDA device for the block (Triton launches on the current device); a no-op for
    other devices."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def group_by_device(layers) -> dict[torch.device, list]:
    """Cache layers grouped by the device their keys live on (a sharded target's cache spans devices)."""
    groups: dict[torch.device, list] = {}
    for layer in layers:
        groups.setdefault(layer.keys.device, []).append(layer)
    return groups
