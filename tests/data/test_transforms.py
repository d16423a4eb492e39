"""The transforms' augmentation as discrete variants (what a cache of transformed inputs relies on)."""

from __future__ import annotations

import torch

from fedtalora.data import ImageTransform, Split, TextTransform, tokenize_split


def test_drawn_variants_are_the_flips_the_transform_draws() -> None:
    # Prepare: one batch, two generators from the same seed
    images = torch.randint(0, 256, (9, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = ImageTransform(4, (0.5,) * 3, (0.25,) * 3)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)

    # Execute: the transform draws its flips; the same draws as variants, applied explicitly
    drawn = t(images, train=True, generator=g1)
    variants = t.draw_variants(9, g2)
    given = t(images, train=False, variants=variants)

    # Assert: identical batches, identical generator states afterwards, both variants occur
    assert torch.equal(drawn, given)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert t.variants == 2 and set(variants.tolist()) == {0, 1}
    assert torch.equal(t(images, train=False, variants=torch.zeros(9, dtype=torch.long)), t(images, train=False))
    flipped = t(images, train=False, variants=torch.ones(9, dtype=torch.long))
    assert torch.equal(flipped, t(images, train=False).flip(-1))  # variant 1 is the horizontal flip


def test_text_has_one_variant_and_draws_nothing(tiny_bert) -> None:
    from transformers import AutoTokenizer

    split = tokenize_split(Split(["card lost", "where is my card"], [0, 1]), AutoTokenizer.from_pretrained(str(tiny_bert)),
                           8)
    t, g = TextTransform(), torch.Generator().manual_seed(1)
    before = g.get_state()
    assert t.variants == 1 and t.draw_variants(2, g).tolist() == [0, 0]
    assert torch.equal(g.get_state(), before)
    assert t(split.inputs[torch.arange(2)], variants=torch.zeros(2, dtype=torch.long))["padded"]
