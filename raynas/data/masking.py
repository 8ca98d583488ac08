"""BERT's masked-LM corruption (15 % of tokens; of those 80 % [MASK], 10 % random, 10 % kept).

Masks are drawn from an explicit ``torch.Generator`` rather than the global RNG,
so they are reproducible per seed and the :class:`MLMCollator`'s state can be
checkpointed: a resumed supernet run masks the next batch exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raynas.errors import require

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class MaskingSpecials:
    """What masking needs from a tokenizer; build it directly to mask without one."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]  # never selected: [CLS], [SEP], [PAD], ...
    pad_token_id: int = 0

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> MaskingSpecials:
        """Take the ids from a transformers tokenizer (``len`` counts added tokens too)."""
        require(tokenizer.mask_token_id is not None, "masking: tokenizer has no [MASK] token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(int(tokenizer.mask_token_id), len(tokenizer), tuple(int(i) for i in tokenizer.all_special_ids), pad)


def as_specials(tokenizer_or_specials: Any) -> MaskingSpecials:
    """Accept either a tokenizer or a ready :class:`MaskingSpecials`."""
    if isinstance(tokenizer_or_specials, MaskingSpecials):
        return tokenizer_or_specials
    return MaskingSpecials.from_tokenizer(tokenizer_or_specials)


def mask_tokens(input_ids: torch.Tensor, tokenizer_or_specials: Any, mlm_probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked_ids, labels)``: labels hold the original id where a token was selected, -100 elsewhere.

    Each non-special token is selected with ``mlm_probability``; a selected token becomes [MASK]
    with probability 0.8, a uniformly random vocabulary id with 0.1, and stays itself with 0.1.
    ``input_ids`` is not modified.
    """
    require(0.0 < mlm_probability < 1.0, f"masking: mlm_probability must be in (0, 1), got {mlm_probability}")
    specials = as_specials(tokenizer_or_specials)
    ids = input_ids.long()
    device = ids.device
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def uniform() -> torch.Tensor:
        return torch.rand(ids.shape, generator=generator, device=gen_device).to(device)

    special = torch.isin(ids, torch.tensor(specials.special_ids, dtype=ids.dtype, device=device))
    selected = (uniform() < mlm_probability) & ~special
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    draw = uniform()  # one draw splits the selected tokens 80 / 10 / 10
    to_mask = selected & (draw < 0.8)
    to_random = selected & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(specials.vocab_size, ids.shape, generator=generator, device=gen_device).to(device)
    masked = torch.where(to_mask, torch.full_like(ids, specials.mask_token_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


class MLMCollator:
    """Rows -> ``{"input_ids", "attention_mask", "labels"}`` tensors with fresh BERT masks.

    Rows are token-id lists (or mappings with ``input_ids``); unequal rows are right-padded and
    padding is never masked. The generator state is checkpointable via :meth:`state_dict`.
    """

    def __init__(self, tokenizer_or_specials: Any, mlm_probability: float = 0.15, seed: int = 0) -> None:
        self.specials = as_specials(tokenizer_or_specials)
        self.mlm_probability = mlm_probability
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        seqs = [_row_ids(r) for r in rows]
        require(len(seqs) > 0, "collator: empty batch")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.specials.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = seq
            attention[i, : len(seq)] = 1
        masked, labels = mask_tokens(ids, self.specials, self.mlm_probability, self.generator)
        labels[attention == 0] = -100  # padding is never a target, even if [PAD] is not listed as special
        masked = torch.where(attention == 0, ids, masked)
        return {"input_ids": masked, "attention_mask": attention, "labels": labels}

    def state_dict(self) -> dict[str, Any]:
        """The generator state: save it with the training checkpoint."""
        return {"generator": self.generator.get_state(), "mlm_probability": self.mlm_probability}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the mask stream exactly where :meth:`state_dict` left it."""
        self.generator.set_state(state["generator"])
        self.mlm_probability = float(state.get("mlm_probability", self.mlm_probability))


def _row_ids(row: Any) -> torch.Tensor:
    if isinstance(row, Mapping):
        row = row["input_ids"]
    if isinstance(row, torch.Tensor):
        return row.long().reshape(-1)
    require(isinstance(row, Iterable), f"collator: a row must be token ids or a mapping with input_ids, got {type(row)}")
    return torch.as_tensor(list(row), dtype=torch.long)
