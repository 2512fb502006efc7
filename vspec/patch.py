"""``apply_vspec``: make ``target.generate`` run speculative decoding, with an undo."""

from __future__ import annotations

from .runtime.config import SpecConfig
from .runtime.engine import SpecDecoder

_MARK = "_vspec_handle"


class VSpecHandle:
    """Returned by :func:`apply_vspec`. ``undo()`` restores the original ``generate``; also a context manager."""

    def __init__(self, target, decoder: SpecDecoder, had_instance_attr: bool, original):
        self.target = target
        self.decoder = decoder
        self._had_instance_attr = had_instance_attr
        self._original = original
        self.active = True
        self.last_stats = None

    def undo(self) -> None:
        if not self.active:
            return
        if self._had_instance_attr:
            self.target.generate = self._original
        else:
            del self.target.generate
        delattr(self.target, _MARK)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False


def apply_vspec(target, draft, config: SpecConfig | None = None, *, tokenizer=None) -> VSpecHandle:
    """Patch ``target.generate`` (this instance only) to run :class:`SpecDecoder` with ``draft``.

    The patched ``generate`` takes the same inputs and generation options as :meth:`SpecDecoder.generate` (resolved
    from the model's ``generation_config`` as transformers does) and returns the sequences tensor, or, with
    ``return_dict_in_generate=True``, the :class:`SpecOutput` (``.sequences``, ``.stats``). The stats of the latest
    call are also on ``handle.last_stats``. Options vspec does not apply (beam search, ``assistant_model``, custom
    logits processors, ``output_scores``, ...) raise ``ValueError`` naming them. Returns a handle; ``handle.undo()``
    restores the original. ``tokenizer``: the pair's tokenizer or processor, optional (bounds the shared vocabulary
    when the two models' logit counts differ by padding, see :mod:`vspec.runtime.vocab`).
    """
    if getattr(target, _MARK, None) is not None:
        raise RuntimeError("apply_vspec: this model is already patched; call handle.undo() first")
    decoder = SpecDecoder(target, draft, config, tokenizer=tokenizer)
    had = "generate" in target.__dict__
    original = target.__dict__.get("generate")
    handle = VSpecHandle(target, decoder, had, original)

    def generate(input_ids=None, *args, **kwargs):
        if args:
            raise TypeError("the vspec-patched generate takes the inputs as keyword arguments after input_ids")
        out = decoder.generate(input_ids, **kwargs)
        handle.last_stats = out.stats
        return out if out.settings.return_dict_in_generate else out.sequences

    target.generate = generate
    setattr(target, _MARK, handle)
    return handle
