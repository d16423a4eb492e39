"""Batch-level preprocessing: images to normalised tensors, text to token ids that batch like tensors.

:class:`ImageTransform` turns a ``uint8`` batch into a normalised ``float32`` batch at the backbone's
input size, on whatever device the batch lives; its only randomness (horizontal flips) comes from an
explicit generator. Text is tokenised once per split (:func:`tokenize_split`) into :class:`Tokens`, which
index and move to a device like a tensor, so the client loop is the same for images and text;
:class:`TextTransform` turns a batch of them into the encoder's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DataError
from .types import Split

__all__ = ["ImageTransform", "TextTransform", "Tokens", "tokenize_split"]


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


class ImageTransform:
    """Batch-level preprocessing: ``uint8 (B, 3, H, W)`` -> normalised ``float32 (B, 3, S, S)``.

    Steps: scale to ``[0, 1]``; resize to ``image_size`` with :func:`torch.nn.functional.interpolate`
    (antialiased when downsampling, skipped when already that size); when ``train`` is true, flip
    each image horizontally with probability 1/2 using ``generator``; normalise with ``mean``/``std``.
    Runs on the batch's device and is deterministic given the generator.

    Args:
        image_size: Output height and width ``S``.
        mean: Per-channel mean subtracted after scaling to ``[0, 1]``.
        std: Per-channel standard deviation divided by after subtracting the mean.
        interpolation: One of ``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"area"``.
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        interpolation: str = "bilinear",
    ) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r})"
        )

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        size = self.image_size
        if height == size and width == size:
            return x
        kwargs: dict[str, Any] = {}
        if self.interpolation in ("bilinear", "bicubic"):
            kwargs["align_corners"] = False
            kwargs["antialias"] = height > size or width > size
        x = F.interpolate(x, size=(size, size), mode=self.interpolation, **kwargs)
        return x.clamp_(0.0, 1.0) if self.interpolation == "bicubic" else x

    def __call__(
        self, images_uint8: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Preprocess a batch.

        Args:
            images_uint8: ``uint8`` tensor of shape ``(B, 3, H, W)`` on any device.
            train: Apply random horizontal flips.
            generator: Source of the flip draws (on any device; the draws are moved to the batch's
                device). ``None`` uses torch's default generator, which is not reproducible.

        Returns:
            ``float32`` tensor of shape ``(B, 3, image_size, image_size)`` on the input's device.
        """
        if images_uint8.dtype != torch.uint8:
            raise ValueError(f"ImageTransform expects uint8 images, got {images_uint8.dtype}")
        if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"ImageTransform expects shape (B, 3, H, W), got {tuple(images_uint8.shape)}")
        device = images_uint8.device
        x = images_uint8.to(torch.float32).div_(255.0)
        x = self._resize(x)
        if train and x.shape[0] > 0:
            draw_device = generator.device if generator is not None else device
            flip = torch.rand(x.shape[0], generator=generator, device=draw_device)
            if flip.device != device:  # host draws for a GPU batch: an asynchronous copy, no wait for the GPU
                flip = (flip.pin_memory() if device.type == "cuda" else flip).to(device, non_blocking=True)
            x = torch.where((flip < 0.5)[:, None, None, None], x.flip(-1), x)
        mean, std = self._stats(device)
        return (x - mean) / std

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as ``(1, 3, 1, 1)`` tensors on ``device``, made once per device (a tensor
        made from Python numbers on a GPU is a synchronous copy)."""
        if device not in self._on_device:
            self._on_device[device] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                                            for v in (self.mean, self.std))
        return self._on_device[device]


# --------------------------------------------------------------------------------------------------
# Tokenised inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """Right-padded token ids of ``N`` sequences, indexable like a tensor.

    Attributes:
        input_ids: ``(N, L)`` integer ids (``L`` = the longest sequence, at most ``data.max_length``).
        attention_mask: ``(N, L)``, 1 on real tokens.
        lengths: ``(N,)`` number of real tokens of each sequence, always on the CPU, so that trimming a
            batch to its longest sequence (:meth:`to`) needs no device synchronisation.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: Any) -> Tokens:
        return Tokens(self.input_ids[index], self.attention_mask[index], self.lengths[index])

    def pin_memory(self) -> Tokens:
        """The batch in page-locked host memory (for asynchronous copies to a GPU)."""
        return Tokens(self.input_ids.pin_memory(), self.attention_mask.pin_memory(), self.lengths)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Tokens:
        """The batch trimmed to its longest sequence, on ``device``."""
        width = int(self.lengths.max()) if len(self) else 0
        return Tokens(
            self.input_ids[:, :width].to(device, non_blocking=non_blocking),
            self.attention_mask[:, :width].to(device, non_blocking=non_blocking),
            self.lengths,
        )


def tokenize_split(split: Split, tokenizer: Any, max_length: int) -> Split:
    """Tokenise a text split once (right padding to the longest sequence, truncation to ``max_length``)."""
    texts = list(split.inputs)
    if texts and not all(isinstance(t, str) for t in texts):
        raise DataError("text dataset: every input must be a string")
    tokenizer.padding_side = "right"
    if not texts:
        empty = torch.zeros((0, 1), dtype=torch.int32)
        return Split(Tokens(empty, empty.clone(), torch.zeros(0, dtype=torch.int64)), split.labels)
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    mask = enc["attention_mask"].to(torch.int8)
    ids = enc["input_ids"].to(torch.int32)
    lengths = mask.sum(dim=1).to(torch.int64)
    return Split(Tokens(ids, mask, lengths), split.labels)


class TextTransform:
    """Turns a batch of :class:`Tokens` into the inputs of :class:`~fedtalora.model.hf.HFEncoder`:
    ``input_ids``, ``attention_mask`` and ``padded`` (a Python bool: whether any sequence is shorter than
    the batch, known on the host from the CPU lengths, so the encoder need not ask the device)."""

    def __call__(self, batch: Tokens, *, train: bool = False,
                 generator: torch.Generator | None = None) -> dict[str, Any]:
        del train, generator  # no augmentation for text
        padded = bool(len(batch) and int(batch.lengths.min()) < batch.input_ids.shape[1])
        return {"input_ids": batch.input_ids.long(), "attention_mask": batch.attention_mask.long(), "padded": padded}

    def __repr__(self) -> str:
        return "TextTransform()"
