"""GPU readiness, checked on the CPU: the client's inner loop never reads a value back from the device.

A host-device synchronisation (``loss.item()``, ``float(t)``, ``bool(t)``, ``t.tolist()``, ``t.cpu()``) in
the step loop makes the host wait for the GPU after every step. The ``meta`` device stands in for a
GPU whose values the host can never see: every read-back from a meta tensor raises. So the loop
(:func:`fedtalora.client.train_steps`) running to the end on ``meta``, with the model and the loss
there, proves it contains no read-back; host-side bookkeeping (shuffling, length sorting, the flip
draws) stays on the CPU, as it should.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtalora.config import RunConfig, TrainConfig, from_dict
from fedtalora.data import ImageTransform, Split
from fedtalora.fed.build import build_method, method_context
from fedtalora.fed.client import make_optimizer, predict, to_device, train_steps
from fedtalora.methods import METHODS, Method

META = torch.device("meta")


def _run_on_meta(model: Any, method: Method, inputs: Any, targets: torch.Tensor, transform: Any,
                 cfg: TrainConfig, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The inner loop with the model on ``meta`` (the method's extra trainables attached first)."""
    keys = method.trainable_keys(model)
    params = model.parameters_by_key()
    for k, p in params.items():
        p.requires_grad_(k in keys)
    model.to(META)
    method.on_local_start(model, {k: v for k, v in model.parameters_by_key().items() if k in keys})
    opt = make_optimizer(method.param_groups(model, keys), cfg)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:5] = True
    return train_steps(model, method, opt, inputs, torch.arange(len(targets)), targets, mask,
                       transform=transform, cfg=cfg, generator=torch.Generator().manual_seed(0), device=META,
                       lengths=lengths)


def _image_batch(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
            torch.randint(0, 5, (n,), generator=g))


# Methods whose client step runs a plain forward/backward; pilora and prompt build extra modules on
# attach that are checked separately below when they run on meta.
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("method_name", ["fedtalora", "fedlora", "ffa-lora", "fedprox", "head-only", "finetune"])
def test_image_inner_loop_reads_nothing_back(method_name: str, optimizer: str, make_tiny_model) -> None:
    """Every step of every local epoch runs with the model on ``meta``: no read-back from the device."""
    # Prepare
    cfg = from_dict({"method": method_name, "train": {"optimizer": optimizer, "batch_size": 8,
                                                                "local_epochs": 2}})
    method = build_method(cfg)
    model = make_tiny_model()
    method.attach(model)
    inputs, targets = _image_batch()

    # Execute
    total, steps = _run_on_meta(model, method, inputs, targets, ImageTransform(8, (0.5,) * 3, (0.25,) * 3),
                                cfg.train)

    # Assert: 2 epochs x ceil(20 / 8) steps, the loss sum still on the device
    assert steps == 6
    assert total.device.type == "meta" and total.shape == ()


def test_a_read_back_in_the_loop_is_caught(make_tiny_model) -> None:
    """The check can fail: a loss hook that reads the loss (as a per-step ``float(loss)`` would) raises on meta."""

    class Syncing(METHODS.get("fedtalora")):  # type: ignore[misc, valid-type]
        def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, model: Any) -> torch.Tensor:
            out = super().loss(logits, targets, model=model)
            if float(out.detach()) > 1e9:  # a host-device synchronisation per step
                raise AssertionError("unreachable")
            return out

    cfg = RunConfig()
    inputs, targets = _image_batch()
    with pytest.raises(RuntimeError, match="meta"):
        _run_on_meta(make_tiny_model(), Syncing(None, method_context(cfg)), inputs, targets, ImageTransform(8, (0.5,) * 3, (0.25,) * 3),
                     TrainConfig(batch_size=8, local_epochs=1))


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (config, tokenizer, weights) in a folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("sync-bert")
    words = ["card", "money", "transfer", "lost", "pin", "fee", "top", "up", "cash", "rate"]
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(str(root))
    config = BertConfig(vocab_size=15, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(root))
    return root


def test_text_inner_loop_reads_nothing_back(tiny_bert_dir: Path) -> None:
    """Text batches (grouped by length, trimmed on the host from CPU lengths) need no read-back either."""
    # Prepare
    from fedtalora.config import LoraConfig, ModelConfig
    from fedtalora.data.transforms import TextTransform, tokenize_split
    from fedtalora.model import build_model

    model = build_model(ModelConfig(backbone=f"hf:{tiny_bert_dir}", pretrained=True, kwargs={}),
                        LoraConfig(rank=2, blocks=[0, 1]), 10, 8, 0)
    rng = np.random.default_rng(0)
    words = ["card", "money", "transfer", "lost", "pin", "fee", "top", "up", "cash", "rate"]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(24)]
    split = tokenize_split(Split(texts, rng.integers(0, 5, 24)), model.backbone.tokenizer, 16)
    cfg = from_dict({"train": {"batch_size": 8, "local_epochs": 2, "group_by_length": True}})

    # Execute
    total, steps = _run_on_meta(model, build_method(cfg), split.inputs,
                                torch.as_tensor(split.labels), TextTransform(), cfg.train,
                                lengths=split.inputs.lengths)

    # Assert
    assert steps == 6 and total.device.type == "meta"


def test_to_device_keeps_values_and_types_on_cpu() -> None:
    """On the CPU :func:`to_device` is a no-op copy target (pinning applies to GPUs only)."""
    x = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    y = to_device(x, torch.device("cpu"))
    assert torch.equal(x, y) and y.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_pins_host_batches_for_a_gpu() -> None:  # pragma: no cover - GPU only
    x = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    y = to_device(x, torch.device("cuda"))
    assert y.is_cuda and torch.equal(y.cpu(), x)


def test_evaluation_runs_without_autograd(make_tiny_model) -> None:
    """Batched evaluation builds no graph: predict runs under inference mode, in eval mode."""
    # Prepare
    model = make_tiny_model()
    inputs, _ = _image_batch(10)
    seen: list[tuple[bool, bool, bool]] = []

    def spy(module: Any, args: Any, out: torch.Tensor) -> None:
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled(), module.training))

    model.head.register_forward_hook(spy)
    transform: Callable[..., torch.Tensor] = ImageTransform(8, (0.5,) * 3, (0.25,) * 3)

    # Execute
    preds = predict(model, Split(inputs, np.zeros(10)), np.arange(10), num_seen=5, transform=transform,
                    batch_size=4, device=torch.device("cpu"))

    # Assert: 3 batches of at most 4, no gradients, inference mode, eval mode
    assert preds.shape == (10,) and preds.max() < 5
    assert seen == [(False, True, False)] * 3


@pytest.mark.parametrize("lengths", [[5, 5, 5], [5, 2, 4], [1, 5, 3]])
def test_encoder_mask_from_the_host_matches_transformers(tiny_bert_dir: Path, lengths: list[int]) -> None:
    """With ``padded`` known on the host the encoder gives what transformers gives from the 2D mask."""
    # Prepare
    from fedtalora.config import LoraConfig, ModelConfig
    from fedtalora.data.transforms import TextTransform, Tokens
    from fedtalora.model import build_model

    model = build_model(ModelConfig(backbone=f"hf:{tiny_bert_dir}", pretrained=True, kwargs={}),
                        LoraConfig(rank=2, blocks=[0, 1]), 10, 8, 0).eval()
    ids = torch.randint(5, 15, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int8)
    batch = Tokens(ids * mask, mask, torch.tensor(lengths)).to("cpu")

    # Execute
    x = TextTransform()(batch)
    with torch.no_grad():
        new = model.features(x)
        old = model.features({k: v for k, v in x.items() if k != "padded"})  # transformers decides on the device

    # Assert
    assert x["padded"] == (min(lengths) < max(lengths))
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
