"""The finite check of tensors entering a run and the relative size of an update
(:mod:`fedtalora.core.integrity`): seeded properties and hand examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtalora.core.integrity import (
    LARGE_UPDATE_RATIO,
    first_nonfinite,
    nonfinite_message,
    relative_update_norm,
)


@pytest.mark.parametrize("seed", range(20))
def test_first_nonfinite_finds_the_first_bad_tensor_and_counts_exactly(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    tensors = {f"t{i}": torch.randn(int(rng.integers(1, 5)), int(rng.integers(1, 5)), generator=g) for i in range(n)}
    tensors["ints"] = torch.arange(6)
    assert first_nonfinite(tensors) is None and nonfinite_message(tensors, "x") is None
    bad = int(rng.integers(0, n))
    flat = tensors[f"t{bad}"].view(-1)
    k = int(rng.integers(1, flat.numel() + 1))
    positions = rng.choice(flat.numel(), size=k, replace=False)
    flat[torch.from_numpy(positions)] = torch.tensor([float("nan"), float("inf"), -float("inf")])[
        torch.from_numpy(rng.integers(0, 3, size=k))]
    later = [i for i in range(bad + 1, n)]
    if later:  # a later bad tensor must not be reported first
        tensors[f"t{later[0]}"].view(-1)[0] = float("nan")
    assert first_nonfinite(tensors) == (f"t{bad}", k)


def test_first_nonfinite_hand_example() -> None:
    tensors = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0]]),
               "c": torch.tensor([float("nan")])}
    assert first_nonfinite(tensors) == ("b", 2)
    assert first_nonfinite(list(tensors.items())[:1]) is None
    assert nonfinite_message(tensors, "model.checkpoint='w.pth'") == (
        "model.checkpoint='w.pth': tensor 'b' has 2 non-finite value(s) (NaN or infinity); refusing to use it")
    assert first_nonfinite({"h": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)}) == ("h", 1)


def test_relative_update_norm_hand_example() -> None:
    g = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # ||g|| = 5
    u = {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor([[12.0]])}  # ||u - g|| = sqrt(36 + 64) = 10
    assert relative_update_norm(u, g) == 2.0
    assert relative_update_norm(g, g) == 0.0
    zero = {"a": torch.zeros(2)}
    assert relative_update_norm(zero, zero) == 0.0 and relative_update_norm({"a": torch.ones(2)}, zero) == float("inf")


@pytest.mark.parametrize("seed", range(10))
def test_relative_update_norm_properties(seed: int) -> None:
    """Property: invariant to scaling update and state together; a 'scale' fault (the difference times
    1000) multiplies it by 1000."""
    gen = torch.Generator().manual_seed(seed)
    g = {f"k{i}": torch.randn(3, 4, generator=gen) for i in range(3)}
    u = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in g.items()}
    r = relative_update_norm(u, g)
    assert 0 < r < 1
    c = float(torch.rand(1, generator=gen)) * 10 + 0.1
    assert relative_update_norm({k: c * v for k, v in u.items()}, {k: c * v for k, v in g.items()}) == \
        pytest.approx(r, rel=1e-6)  # the scaled float32 tensors round
    scaled = {k: g[k] + 1000 * (u[k] - g[k]) for k in g}
    assert relative_update_norm(scaled, g) == pytest.approx(1000 * r, rel=1e-6)
    assert relative_update_norm(scaled, g) > LARGE_UPDATE_RATIO * r
