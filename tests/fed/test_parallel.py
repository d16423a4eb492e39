"""Client-parallel local training (``train.parallel_clients``) equals the serial path.

Every client's returned tensors within 1e-5 of their scale, its mean loss within 1e-6 relative, the same steps
and samples: SGD and AdamW, images and text, task and client logit masks, FedProx (a loss that reads the
trainable tensors), FFA-LoRA (a shared frozen A), head-only (no LoRA swapped), clients with different numbers of
batches. Whole runs give the same ``metrics.json`` apart from timing. Methods and models that cannot batch fall
back to the serial path, by their capability flag.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedtalora.api import prepare, run
from fedtalora.config import LoraConfig, ModelConfig, TrainConfig, from_dict, resolve
from fedtalora.core.scenario import Task
from fedtalora.data import ImageTransform, Split, TextTransform, tokenize_split
from fedtalora.fed.build import build_method
from fedtalora.fed.client import ClientJob, local_train
from fedtalora.fed.history import without_timing
from fedtalora.fed.parallel import (
    GroupedLinear,
    combine_batches,
    grouped_modules,
    length_buckets,
    train_steps_together,
    train_together,
    why_serial,
)
from fedtalora.fed.transport import class_mask, parallel_group, task_mask
from fedtalora.model import build_model
from fedtalora.model.prefix import Activations
from fedtalora.seeding import torch_generator

SIZES = (5, 23, 40)  # 1, 3 and 5 batches of 8 per epoch: clients finish at different steps


# --- pieces -----------------------------------------------------------------------------------------------


def test_grouped_linear_applies_each_clients_weights_to_its_rows() -> None:
    # Prepare: 2 clients, 2 rows each, a hand example
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, -1.0]]])  # (G=2, out=2, in=2)
    bias = torch.tensor([[0.0, 1.0], [10.0, 0.0]])
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0]])

    # Execute
    y = GroupedLinear(w, bias)(x)

    # Assert: rows 0-1 through client 0, rows 2-3 through client 1
    assert y.tolist() == [[1.0, 3.0], [3.0, 5.0], [12.0, -2.0], [16.0, -4.0]]
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, generator=g), torch.randn(3 * 6, 7, 4, generator=g)
    want = torch.cat([F.linear(x[6 * i:6 * i + 6], w[i], b[i]) for i in range(3)])
    assert torch.allclose(GroupedLinear(w, b)(x), want, atol=1e-6)


def test_combine_batches_pads_rows_and_masks_text_padding() -> None:
    # Images: 1 and 3 rows -> 2 x 3 rows, the padding zero
    images, rows = combine_batches([torch.ones(1, 3, 2, 2), torch.full((3, 3, 2, 2), 2.0)])
    assert rows == 3 and images.shape == (6, 3, 2, 2)
    assert images[1:3].abs().sum() == 0 and (images[3:] == 2).all()

    # Text: widths 2 and 3; the padding row attends to its first token only
    a = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]]), "padded": False}
    b = {"input_ids": torch.tensor([[7, 8, 9], [7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
         "padded": True}
    text, rows = combine_batches([a, b])
    assert rows == 2 and text["padded"]
    assert text["input_ids"].tolist() == [[5, 6, 0], [0, 0, 0], [7, 8, 9], [7, 0, 0]]
    assert text["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]

    # Cached activations: pooled rows, or hidden states with their masks
    acts, rows = combine_batches([Activations(torch.ones(2, 4), None), Activations(torch.ones(1, 4), None)])
    assert rows == 2 and acts.hidden.shape == (4, 4) and acts.hidden[3].abs().sum() == 0
    with pytest.raises(TypeError):
        combine_batches([[1, 2]])


def test_grouped_modules_restore_the_model(make_tiny_model) -> None:
    model = make_tiny_model()
    before = {n: m for n, m in model.named_modules()}
    keys = list(model.lora_parameters()) + list(model.head_parameters())
    tensors = {k: p.detach().unsqueeze(0).repeat(2, *([1] * p.ndim)) for k, p in model.parameters_by_key().items()
               if k in keys}
    x = torch.randn(3, 3, 8, 8)
    with grouped_modules(model, tensors):
        assert isinstance(model.head, GroupedLinear)
        out = model(torch.cat([x, x]))
    assert {n: m for n, m in model.named_modules()} == before
    assert torch.allclose(out, torch.cat([model(x), model(x)]), atol=1e-5)  # the same weights for both clients


# --- one group against the serial path --------------------------------------------------------------------


def _jobs(sizes: tuple[int, ...], targets_all: np.ndarray, mask_kind: str, num_classes: int) -> list[ClientJob]:
    task = Task(index=0, classes=tuple(range(num_classes // 2)), label_offset=0)
    jobs, start = [], 0
    for k, n in enumerate(sizes):
        idx = np.arange(start, start + n)
        start += n
        jobs.append(ClientJob(k, idx, targets_all[idx], class_mask(mask_kind, task_mask(num_classes, task),
                                                                   targets_all[idx]),
                              torch_generator(0, "local", 0, 0, k)))
    return jobs


def _compare(model: Any, method: Any, split: Split, transform: Any, cfg: TrainConfig, jobs_of: Any) -> None:
    """Serial local_train per client vs train_together on the same clients: tensors, losses, steps."""
    keys = method.trainable_keys(model)
    global_state = model.trainable_state(keys)
    serial = [local_train(model, method, global_state, client=j.client, split=split, indices=j.indices,
                          targets=j.targets, class_mask=j.class_mask, transform=transform, cfg=cfg,
                          generator=j.generator, device=torch.device("cpu")) for j in jobs_of()]
    together = train_together(model, method, global_state, jobs_of(), split=split, transform=transform, cfg=cfg,
                              device=torch.device("cpu"))
    assert [r.client for r in together] == [r.client for r in serial]
    for s, p in zip(serial, together, strict=True):
        assert (p.steps, p.num_samples) == (s.steps, s.num_samples)
        assert abs(p.loss - s.loss) <= 1e-6 * max(1.0, abs(s.loss)), (p.client, p.loss, s.loss)
        assert set(p.state) == set(s.state) == set(keys)
        for k in keys:
            scale = float(s.state[k].abs().max()) or 1.0
            diff = float((p.state[k] - s.state[k]).abs().max())
            assert diff <= 1e-5 * scale, (p.client, k, diff, scale)
        assert any(not torch.equal(s.state[k], global_state[k]) for k in keys)  # they trained


@pytest.mark.parametrize(("method_name", "optimizer", "mask_kind"), [
    ("fedtalora", "sgd", "task"), ("fedtalora", "adamw", "client"), ("fedprox", "sgd", "client"),
    ("fedprox", "adamw", "task"), ("ffa-lora", "adamw", "task"), ("head-only", "sgd", "none"),
    ("fedlora", "sgd", "task"),
])
def test_image_clients_trained_together_equal_the_serial_path(method_name, optimizer, mask_kind,
                                                               make_tiny_model) -> None:
    # Prepare: 3 clients of 5, 23 and 40 images (flips drawn per client), 2 local epochs of batches of 8
    cfg = from_dict({"method": method_name, "method_options": {"mu": 0.5} if method_name == "fedprox" else {},
                     "train": {"optimizer": optimizer, "batch_size": 8, "local_epochs": 2, "lr": 0.05, "head_lr": 0.05,
                               "weight_decay": 0.01, "logit_mask": mask_kind}})
    method = build_method(cfg)
    model = make_tiny_model()
    method.attach(model)
    g = torch.Generator().manual_seed(3)
    n = sum(SIZES)
    split = Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                  torch.randint(0, 5, (n,), generator=g).numpy())
    transform = ImageTransform(8, (0.5,) * 3, (0.25,) * 3)

    # Execute + Assert
    _compare(model, method, split, transform, cfg.train, lambda: _jobs(SIZES, split.labels, mask_kind, 10))


@pytest.mark.parametrize(("optimizer", "group_by_length"), [("sgd", False), ("adamw", True)])
def test_text_clients_trained_together_equal_the_serial_path(optimizer, group_by_length, tiny_bert,
                                                              text_corpus) -> None:
    # Prepare: the tiny BERT, LoRA in both layers, sentences of different lengths (padding differs per client)
    cfg = from_dict({"method": "fedprox", "method_options": {"mu": 0.1},
                     "train": {"optimizer": optimizer, "batch_size": 4, "local_epochs": 2, "lr": 0.01, "head_lr": 0.05,
                               "group_by_length": group_by_length}})
    method = build_method(cfg)
    model = build_model(ModelConfig(backbone=f"hf:{tiny_bert}", pretrained=True),
                        LoraConfig(rank=2, alpha=4.0, blocks=[0, 1]), 6, 0, 0)
    method.attach(model)
    rng = np.random.default_rng(0)
    names = list(text_corpus.intents)
    labels = rng.integers(0, 3, 30)  # the task of the mask: classes 0-2 of 6
    texts = [text_corpus.sentences(names[c], 1, rng)[0] for c in labels]
    split = tokenize_split(Split(texts, labels), model.backbone.tokenizer, 16)

    # Execute + Assert
    _compare(model, method, split, TextTransform(), cfg.train, lambda: _jobs((3, 11, 16), split.labels, "task", 6))


def test_the_parallel_loop_reads_nothing_back_from_the_device(make_tiny_model) -> None:
    """GPU readiness on the CPU: the loop runs to the end with the model on ``meta`` (every read-back raises)."""
    cfg = TrainConfig(batch_size=8, local_epochs=2, optimizer="adamw")
    method = build_method(from_dict({"method": "fedprox"}))
    model = make_tiny_model().to("meta")
    split = Split(torch.zeros(sum(SIZES), 3, 8, 8, dtype=torch.uint8), np.zeros(sum(SIZES)))
    state = model.trainable_state(method.trainable_keys(model))

    states, totals, steps = train_steps_together(
        model, method, state, _jobs(SIZES, split.labels, "task", 10), split=split,
        transform=ImageTransform(8, (0.5,) * 3, (0.25,) * 3), cfg=cfg, device=torch.device("meta"))

    assert steps == [2, 6, 10]
    assert all(t.device.type == "meta" for t in totals)
    assert all(v.device.type == "meta" for s in states for v in s.values())


# --- capability and fallback ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method_name", "batches"), [
    ("fedtalora", True), ("fedlora", True), ("ffa-lora", True), ("fedprox", True), ("head-only", True),
    ("pilora", False), ("prompt", False), ("finetune", False),
])
def test_the_method_says_whether_its_clients_train_together(method_name, batches, make_tiny_model) -> None:
    method = build_method(from_dict({"method": method_name}))
    model = make_tiny_model()
    method.attach(model)
    why = why_serial(model, method, method.trainable_keys(model))
    assert (why is None) == batches
    if not batches:
        assert "trains_clients_together" in why
    with pytest.raises(ValueError, match="trains_clients_together") if not batches else _nothing():
        train_together(model, method, model.trainable_state(method.trainable_keys(model)), [],
                       split=Split(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), np.zeros(0)),
                       transform=ImageTransform(8, (0.5,) * 3, (0.25,) * 3), cfg=TrainConfig(),
                       device=torch.device("cpu"))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def test_a_model_that_draws_random_numbers_trains_serially(make_tiny_model) -> None:
    method = build_method(from_dict({}))
    model = build_model(*_dropout_configs(), 10, 8, 0)
    assert "random numbers" in why_serial(model, method, method.trainable_keys(model))
    assert why_serial(make_tiny_model(), method, method.trainable_keys(make_tiny_model())) is None


def _dropout_configs() -> tuple[ModelConfig, LoraConfig]:
    return (ModelConfig(backbone="vit_tiny_patch16_224", pretrained=False,
                        kwargs={"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}),
            LoraConfig(rank=4, blocks=[0], dropout=0.1))


def test_a_model_that_normalises_by_batch_statistics_trains_serially(make_tiny_model) -> None:
    method = build_method(from_dict({}))
    model = make_tiny_model()
    model.backbone.norm_pre = torch.nn.BatchNorm1d(5)  # only its kind matters here
    why = why_serial(model, method, method.trainable_keys(model))
    assert why is not None and "batch statistics" in why and "norm_pre" in why


@pytest.mark.parametrize("method_name", ["pilora", "prompt"])
def test_the_engine_falls_back_to_serial_by_the_flag(method_name, tiny_overrides, caplog) -> None:
    cfg = resolve("tiny-vit", [*tiny_overrides, f"method={method_name}", "train.parallel_clients=3"])
    with caplog.at_level(logging.WARNING, logger="fedtalora.fed.transport"):
        assert parallel_group(prepare(cfg)) == 1
    assert "one after another" in caplog.text and "trains_clients_together" in caplog.text


# --- whole runs -------------------------------------------------------------------------------------------


def _assert_close(a: Any, b: Any, rel: float, where: str = "") -> None:
    """Every metric to ``rel`` (relative above 1, absolute below), except the ``*_rounding`` fields: they
    measure the aggregation's float32 rounding in units of one rounding of the weight, so a difference of the
    clients' states at float32 resolution (the batched matmuls sum in another order) moves them by a fraction
    of that unit. For those the check is the exactness criterion itself (``docs/exactness.md``): both paths are
    within float32 resolution (<= 2 roundings per round, <= 1 accumulated)."""
    if where.endswith("_rounding") and (a is not None or b is not None):
        bound = 1.0 if "accumulated" in where else 2.0
        assert a is not None and b is not None and a <= bound and b <= bound, (where, a, b)
        return
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_close(a[k], b[k], rel, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, rel, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= rel * max(1.0, abs(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("extra", [
    ["method=fedprox", "train.logit_mask=client", "train.optimizer=sgd"],
    ["method=fedtalora", "faults.client_dropout=0.3", "fed.rounds_per_task=3"],  # dropped clients keep their order
])
def test_a_run_with_parallel_clients_equals_the_serial_run(extra, tiny_overrides) -> None:
    base = [*tiny_overrides, *extra]
    serial = run(resolve("tiny-vit", base)).metrics
    together = run(resolve("tiny-vit", [*base, "train.parallel_clients=2"])).metrics  # groups of 2 and 1

    _assert_close(without_timing(together), without_timing(serial), 1e-6)


def test_a_text_run_with_parallel_clients_equals_the_serial_run(tiny_bert, write_banking, text_overrides,
                                                                tmp_path) -> None:
    base = [*text_overrides(tiny_bert, write_banking(tmp_path / "banking")), "train.logit_mask=task"]
    serial = run(resolve("tiny-vit", base)).metrics
    together = run(resolve("tiny-vit", [*base, "train.parallel_clients=3"])).metrics

    _assert_close(without_timing(together), without_timing(serial), 1e-6)


def test_bf16_clients_trained_together_stay_close_to_the_serial_path(make_tiny_model) -> None:
    """The bf16 autocast path (grouped ``bmm`` in bf16 instead of per-client ``linear``) runs and agrees to bf16
    precision."""
    cfg = from_dict({"train": {"optimizer": "adamw", "batch_size": 8, "local_epochs": 1, "precision": "bf16"}})
    method = build_method(cfg)
    model = make_tiny_model()
    g = torch.Generator().manual_seed(3)
    n = sum(SIZES)
    split = Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                  torch.randint(0, 5, (n,), generator=g).numpy())
    transform = ImageTransform(8, (0.5,) * 3, (0.25,) * 3)
    state = model.trainable_state(method.trainable_keys(model))
    jobs = _jobs(SIZES, split.labels, "task", 10)
    together = train_together(model, method, state, jobs, split=split, transform=transform, cfg=cfg.train,
                              device=torch.device("cpu"))
    serial = [local_train(model, method, state, client=j.client, split=split, indices=j.indices, targets=j.targets,
                          class_mask=j.class_mask, transform=transform, cfg=cfg.train, generator=j.generator,
                          device=torch.device("cpu")) for j in _jobs(SIZES, split.labels, "task", 10)]
    for p, s in zip(together, serial, strict=True):
        assert p.loss == pytest.approx(s.loss, rel=0.05)
        for k in s.state:
            assert torch.isfinite(p.state[k]).all()
            assert float((p.state[k] - s.state[k]).abs().max()) <= 0.05 * (float(s.state[k].abs().max()) or 1.0)


def test_text_clients_are_padded_together_only_with_similar_lengths() -> None:
    def text(rows: int, length: int) -> dict[str, Any]:
        return {"input_ids": torch.ones(rows, length, dtype=torch.long), "attention_mask": torch.ones(rows, length),
                "padded": False}

    # lengths 10, 40, 11, 12, 41 (4 rows each): {10, 11, 12} and {40, 41}, each padded by less than 25 %
    assert length_buckets([text(4, 10), text(4, 40), text(4, 11), text(4, 12), text(4, 41)]) == [[0, 2, 3], [1, 4]]
    assert length_buckets([text(4, 10), text(4, 40)], slack=10.0) == [[0, 1]]
    assert length_buckets([torch.zeros(4, 3, 2, 2), torch.zeros(1, 3, 2, 2)]) == [[0, 1]]  # images: one pass
