"""Where the draft runs when it is not simply the target's neighbour: its own CUDA stream (the parallel schedule)
and/or its own device (any schedule). :class:`DraftSide` hands tensors between the two sides,
:class:`DraftSideState` runs every method of the draft's :class:`~vspec.runtime.state.ModelState` on the draft's
side, :func:`draft_state` picks the serial schedules' draft state. On the CPU all of this is program order.

CUDA: streams are ordered by events only; every tensor one stream hands to the other gets ``record_stream`` (the
caching allocator must not recycle it while the other stream may still read it), and every tensor of the draft's
state is allocated on the draft stream.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .devices import input_device
from .models import Prompt
from .state import ModelState


class DraftSide:
    """Where the draft runs: its device and, on CUDA, its own stream (the target keeps the caller's stream).

    ``run()`` enters the draft stream after an event of the main stream; ``send`` / ``fetch`` hand a tensor to the
    draft / main side (an event wait and ``record_stream`` on one device, a copy between devices). On the CPU all of
    this is a no-op and the steps run in program order.
    """

    def __init__(self, main_device, draft_device, *, streams: bool = True):
        self.main_device = torch.device(main_device)
        self.device = torch.device(draft_device)
        # streams=False (the serial schedules' cross-device draft): plain copies, program order
        self.cuda = streams and self.device.type == "cuda" and self.main_device.type == "cuda"
        self.cross = self.device != self.main_device
        self.stream = self.main = self.xfer = None
        if self.cuda:
            self.stream = torch.cuda.Stream(device=self.device)
            self.main = torch.cuda.current_stream(self.main_device)
            if self.cross:
                # the main device's end of draft→main copies: an idle stream, so a copy never queues behind
                # (and never makes the draft stream wait for) the target's forward
                self.xfer = torch.cuda.Stream(device=self.main_device)

    def mark(self):
        """An event of the main stream's current work (None on the CPU)."""
        return self.main.record_event() if self.cuda else None

    @contextlib.contextmanager
    def run(self, after=None):
        """Run the body on the draft stream, after ``after`` (default: everything queued on the main stream)."""
        if not self.cuda or torch.cuda.current_stream(self.device) == self.stream:
            yield
            return
        self.stream.wait_event(after if after is not None else self.mark())
        with torch.cuda.stream(self.stream):
            yield

    def send(self, t):
        """A main-side tensor for use on the draft side (call inside :meth:`run`, before the target's forward is
        queued when the draft is on another device: a cross-device copy is ordered on the main stream)."""
        if t is None or not self.cuda:
            return t if t is None else t.to(self.device)
        if self.cross:
            return t.to(self.device, non_blocking=True)
        t.record_stream(self.stream)
        return t

    def fetch(self, t):
        """A draft-side tensor for the main stream: the main stream waits for the draft stream's work so far."""
        if t is None or not self.cuda:
            return t if t is None else t.to(self.main_device)
        if self.cross:
            with torch.cuda.stream(self.stream), torch.cuda.stream(self.xfer):
                out = t.to(self.main_device, non_blocking=True)
            self.main.wait_stream(self.xfer)
            out.record_stream(self.main)
            return out
        self.main.wait_event(self.stream.record_event())
        t.record_stream(self.main)
        return t

    def prompt(self, prompt: Prompt) -> Prompt:
        """The prompt's tensors on the draft side (inside :meth:`run`)."""
        if not self.cuda and not self.cross:
            return prompt
        kw = {k: (self.send(v) if isinstance(v, torch.Tensor) else v) for k, v in prompt.model_kwargs.items()}
        return dataclasses.replace(
            prompt, input_ids=self.send(prompt.input_ids), attention_mask=self.send(prompt.attention_mask),
            positions=self.send(prompt.positions), visual_mask=self.send(prompt.visual_mask),
            next_pos=self.send(prompt.next_pos), model_kwargs=kw)


class DraftSideState(ModelState):
    """The draft's :class:`ModelState`, every method run on the draft side (stream and device).

    Tensor arguments are handed over with :meth:`DraftSide.send`; ``extent()`` comes back with :meth:`DraftSide.fetch`
    (``RoundSteps.end_round`` reads it with the target's); ``valid`` always lives on the draft's device.
    """

    def __init__(self, model, adapter, side: DraftSide, **state_kwargs):
        self.side = side
        super().__init__(model, adapter, **state_kwargs)

    @property
    def valid(self):
        return ModelState.valid.fget(self)

    @valid.setter
    def valid(self, v):
        if v is not None and (v.device != self.side.device or self.side.cuda):
            with self.side.run():
                v = self.side.send(v)
                ModelState.valid.fset(self, v)
            return
        ModelState.valid.fset(self, v)

    def forward(self, **kw):
        with self.side.run():
            kw = {k: (self.side.send(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            return super().forward(**kw)

    def forward_tree(self, **kw):
        with self.side.run():
            kw = {k: (self.side.send(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            return super().forward_tree(**kw)

    def keep_only(self, start, keep):
        with self.side.run():
            super().keep_only(start, self.side.send(keep))

    def truncate(self, n):
        with self.side.run():
            super().truncate(n)

    def invalidate(self, start, stop, *, trim=True):
        with self.side.run():
            super().invalidate(self.side.send(start), stop, trim=trim)

    def extent(self):
        with self.side.run():
            out = super().extent()
        return self.side.fetch(out)

    def select_rows(self, rows):
        with self.side.run():
            super().select_rows(self.side.send(rows))

    def compact_(self, fullest=None):
        with self.side.run():
            super().compact_(fullest)

    def last_valid(self) -> torch.Tensor:
        """``[B]`` physical index of each row's last valid slot (−1 if none), on the main side."""
        with self.side.run():
            cols = torch.arange(self.length, device=self.valid.device)
            out = torch.where(self.valid, cols, -1).amax(dim=1)
        return self.side.fetch(out)


class BridgedDraftState(DraftSideState):
    """The serial schedules' draft on another device (:func:`draft_state`): a
    :class:`DraftSideState` on a stream-less :class:`DraftSide` whose logits come back on the main device."""

    def forward(self, **kw):
        return self.side.fetch(super().forward(**kw))

    def forward_tree(self, **kw):
        return self.side.fetch(super().forward_tree(**kw))


def draft_state(model, adapter, main_device: torch.device, **state_kwargs):
    """The draft's ``ModelState`` for the serial schedules.

    Same device as the target's inputs: a plain :class:`~vspec.runtime.state.ModelState`. Another device: a state
    that copies the tensors it is given to the draft's device and returns logits and ``extent()`` on
    ``main_device`` (one ``[B, n, V]`` logits copy per draft forward); no streams, so the draft's work and the
    target's do not overlap — ``SpecConfig(parallel=True)`` is the schedule for that. ``state_kwargs`` go to the
    state (``reserve``, ``fixed_shapes``, ``runner``: :class:`~vspec.runtime.state.ModelState`).
    """
    device = input_device(model)
    if device == torch.device(main_device):
        return ModelState(model, adapter, **state_kwargs)
    return BridgedDraftState(model, adapter, DraftSide(main_device, device, streams=False), **state_kwargs)
