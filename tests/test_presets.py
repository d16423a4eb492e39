"""Every shipped preset resolves and validates; the paper presets differ from their base only where named."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from fedtalora.config import load_preset, preset_description, preset_names, resolve
from fedtalora.core.partition import class_counts, partition_task
from fedtalora.data import DATASETS
from fedtalora.seeding import numpy_rng

DATASETS_OF = {"cifar100": "cifar100", "tiny-imagenet": "tiny-imagenet", "imagenet-r": "imagenet-r"}
ALPHAS = (2, 4, 6)
BETAS = (0.05, 0.1, 0.5)


def flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("kwargs", "options"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(name: str, base: str) -> dict[str, object]:
    """The resolved keys of ``name`` whose values differ from ``base``'s."""
    a, b = flat(resolve(name).to_dict()), flat(resolve(base).to_dict())
    return {k: a[k] for k in a if a[k] != b[k]}


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_resolves_validates_and_describes_itself(name: str) -> None:
    cfg = resolve(name)
    assert cfg.data.dataset in DATASETS
    desc = preset_description(name)
    assert desc and "\n" not in desc
    # data.options must be options the dataset's loader takes.
    params = inspect.signature(DATASETS.get(cfg.data.dataset)).parameters
    assert set(cfg.data.options) <= {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert load_preset(name).get("extends") is None  # extends is resolved away


@pytest.mark.parametrize("dataset", list(DATASETS_OF))
def test_paper_grid_of_partitions_for_each_dataset(dataset: str) -> None:
    base = resolve(dataset)
    assert base.data.dataset == DATASETS_OF[dataset]
    assert base.scenario.num_tasks == 10 and base.fed.num_clients == 10
    assert base.model.backbone == "vit_base_patch16_224.dino" and base.model.pretrained
    assert diff(f"{dataset}-q6", dataset) == {}  # the base is the alpha=6 setting
    for a in ALPHAS:
        assert resolve(f"{dataset}-q{a}").partition.alpha == a
        assert set(diff(f"{dataset}-q{a}", dataset)) <= {"partition.alpha"}
    for b in BETAS:
        cfg = resolve(f"{dataset}-d{b:g}")
        assert cfg.partition.kind == "dirichlet" and cfg.partition.beta == b and cfg.partition.min_samples == 10
        assert set(diff(f"{dataset}-d{b:g}", dataset)) <= {"partition.kind", "partition.beta", "partition.min_samples"}


def test_dataset_bases_share_the_cifar100_training_setup() -> None:
    assert diff("tiny-imagenet", "cifar100") == {"data.dataset": "tiny-imagenet", "data.options": {"size": 64}}
    assert diff("imagenet-r", "cifar100") == {"data.dataset": "imagenet-r",
                                              "data.options": {"size": 224, "test_fraction": 0.2}}


@pytest.mark.parametrize(("name", "base", "expected"), [
    ("cifar100-no-residual", "cifar100", {"fed.residual": False}),
    ("cifar100-first4", "cifar100", {}),
    ("cifar100-last4", "cifar100", {"lora.blocks": [8, 9, 10, 11]}),
    ("cifar100-no-mlp", "cifar100", {"lora.targets": ["qkv", "proj"]}),
    ("cifar100-block0", "cifar100", {"lora.blocks": [0]}),
    ("cifar100-block0-no-mlp", "cifar100", {"lora.blocks": [0], "lora.targets": ["qkv", "proj"]}),
    ("cifar100-r2", "cifar100", {"lora.rank": 2, "lora.alpha": 2.0}),
    ("cifar100-r4", "cifar100", {"lora.rank": 4, "lora.alpha": 4.0}),
    ("cifar100-r8", "cifar100", {}),
    ("cifar100-r16", "cifar100", {"lora.rank": 16, "lora.alpha": 16.0}),
    ("tiny-imagenet-first4", "tiny-imagenet", {}),
    ("tiny-imagenet-last4", "tiny-imagenet", {"lora.blocks": [8, 9, 10, 11]}),
])
def test_ablations_change_only_what_they_name(name: str, base: str, expected: dict) -> None:
    assert diff(name, base) == expected
    assert resolve(name).lora.scaling == 1.0  # rank ablations keep s = alpha / rank fixed


# Training samples per class of each dataset (ImageNet-R: 80% of its smallest classes, about 40).
SAMPLES_PER_CLASS = {"cifar100": 500, "tiny-imagenet": 500, "imagenet-r": 40}
CLASSES_PER_TASK = {"cifar100": 10, "tiny-imagenet": 20, "imagenet-r": 20}


@pytest.mark.parametrize("name", [f"{d}-{s}" for d in DATASETS_OF for s in ("q2", "q6", "d0.05", "d0.5")])
def test_paper_partitions_are_feasible_on_a_task_of_that_dataset(name: str) -> None:
    """The partition each paper preset asks for can be drawn on one task of its dataset's size."""
    cfg = resolve(name)
    dataset = cfg.data.dataset
    labels = np.repeat(np.arange(CLASSES_PER_TASK[dataset]), SAMPLES_PER_CLASS[dataset])
    p = cfg.partition
    parts = partition_task(p.kind, labels, cfg.fed.num_clients, numpy_rng(0, "test", name), alpha=p.alpha,
                           beta=p.beta, min_samples=p.min_samples, max_redraws=p.max_redraws)
    assert len(parts) == cfg.fed.num_clients
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    if p.kind == "quantity":
        assert all(len(c) == p.alpha for c in class_counts(labels, parts))
    else:
        assert min(len(x) for x in parts) >= p.min_samples
