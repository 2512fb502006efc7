"""Draft/target pairs whose logit counts differ only by padding.

Qwen2 / Qwen2.5 checkpoints pad one tokenizer's vocabulary to different embedding sizes (151,936 rows for the small
sizes, 152,064 for 7B and larger); the extra rows are never produced by the tokenizer. Such a pair is accepted when
it agrees on everything real — every special and visual token id in both configs (and both generation configs) —
and, when a tokenizer is given, on its vocabulary size. The *shared range* is the tokenizer's length, else the
smaller logit count.

How verification stays lossless: all runtime logits live in the TARGET's vocabulary. The draft's logits are cut to
the shared range and padded with −inf up to the target's count (:meth:`SharedVocab.draft_logits`), so the draft never
proposes a padding row and its distribution q is 0 beyond the shared range; the target's own logits are never cut,
so greedy verification compares with the target's argmax over all its rows and speculative sampling's residual
``max(0, p − q)`` covers the target's whole distribution, padding rows included (lossless even if the target puts
mass there). A token the draft cannot embed (one of the target's padding rows, if the target ever emits it) is fed
to the draft as token 0: that only affects the draft's next proposals, never the output.
"""

from __future__ import annotations

import torch


def _special_ids(model) -> dict[str, object]:
    """Every ``*_token_id`` / ``*_token_index`` of the config, its text config and the generation config."""
    out: dict[str, object] = {}
    sources = [("config", model.config), ("text_config", model.config.get_text_config()),
               ("generation_config", getattr(model, "generation_config", None))]
    for where, cfg in sources:
        if cfg is None:
            continue
        for key, value in vars(cfg).items():
            if (key.endswith("_token_id") or key.endswith("_token_index")) and value is not None:
                out[f"{where}.{key}"] = value
    return out


class SharedVocab:
    """The pair's shared token range (module docstring).

    target_size / draft_size: the models' logit counts; shared: the ids both may produce; identity: nothing to do
    (equal counts and no tokenizer limit below them).
    """

    def __init__(self, target, draft, target_size: int, draft_size: int, *, tokenizer=None):
        self.target_size = target_size
        self.draft_size = draft_size
        self.draft_embed_rows = draft.get_input_embeddings().weight.shape[0]
        tok_len = len(tokenizer) if tokenizer is not None else None
        if target_size != draft_size:
            t_ids, d_ids = _special_ids(target), _special_ids(draft)
            differ = {k: (t_ids[k], d_ids[k]) for k in sorted(t_ids.keys() & d_ids.keys()) if t_ids[k] != d_ids[k]}
            if differ:
                raise ValueError(
                    f"target and draft must share the vocabulary: target has {target_size} logits, draft "
                    f"{draft_size}, and they differ in special/visual token ids ("
                    + ", ".join(f"{k}: target {a}, draft {b}" for k, (a, b) in differ.items())
                    + "): two different tokenizers, not padding"
                )
        shared = min(target_size, draft_size)
        if tok_len is not None:
            if tok_len > shared:
                raise ValueError(f"the tokenizer has {tok_len} tokens but the models produce only {target_size} "
                                 f"(target) and {draft_size} (draft) logits: it is not the pair's tokenizer")
            shared = tok_len
        if target_size != draft_size:
            ids = _special_ids(target)
            high = {k: v for k, v in ids.items() if any(int(i) >= shared for i in (v if isinstance(v, list) else [v]))}
            if high:
                raise ValueError(f"special token ids beyond the shared vocabulary range ({shared}): {high}")
        self.shared = shared
        self.identity = target_size == draft_size and shared == draft_size

    def draft_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[..., draft_size]`` → ``[..., target_size]``: cut to the shared range, −inf beyond it."""
        if self.identity:
            return logits
        x = logits[..., : self.shared]
        pad = self.target_size - self.shared
        return torch.cat([x, x.new_full((*x.shape[:-1], pad), float("-inf"))], dim=-1) if pad else x

    def draft_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids for the draft's embedding: ids it has no row for become 0 (module docstring)."""
        if self.identity or self.draft_embed_rows >= self.target_size:
            return ids
        return torch.where(ids < self.draft_embed_rows, ids, 0)
