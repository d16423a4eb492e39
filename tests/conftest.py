"""Shared fixtures: a tiny, fast run configuration, a tiny model builder and a CLI runner.

Everything here runs offline: ``HF_HUB_OFFLINE=1`` is set before anything imports timm or the hub.
The tiny models are so small that thread start-up dominates; on a shared 2-core machine running
them with several intra-op threads is ~100x slower, so one thread is the default (an explicit
``OMP_NUM_THREADS`` in the environment wins).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# The tiny run: digits at 8x8, 2 tasks x 5 classes, 3 clients all sampled, 2 rounds per task,
# a 2-block ViT with 4x4 patches (4 tokens + cls), LoRA rank 4 on both blocks.
TINY_MODEL_KWARGS: dict[str, Any] = {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_OVERRIDES: tuple[str, ...] = (
    "data.dataset=digits",
    "data.image_size=8",
    "scenario.num_tasks=2",
    "fed.num_clients=3",
    "fed.clients_per_round=3",
    "fed.rounds_per_task=2",
    "train.local_epochs=1",
    "train.batch_size=64",
    "train.device=cpu",
    "model.backbone=vit_tiny_patch16_224",
    "model.pretrained=false",
    "model.kwargs={patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}",
    "lora.rank=4",
    "lora.blocks=[0,1]",
    "partition.kind=dirichlet",
    "partition.beta=0.5",
    "partition.min_samples=5",
)


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """``key=value`` overrides (on top of the ``demo`` preset) for a run of a few seconds.

    Shared by the whole session: extend it as ``[*tiny_overrides, "x=y"]``, never mutate it.
    """
    return list(TINY_OVERRIDES)


def tiny_model_configs(
    *,
    depth: int = 2,
    blocks: Sequence[int] = (0, 1),
    targets: Sequence[str] = ("qkv", "proj", "fc1", "fc2"),
    rank: int = 4,
    alpha: float = 8.0,
) -> tuple[Any, Any]:
    """``(ModelConfig, LoraConfig)`` of a tiny randomly initialised ViT (embed 32, 2 heads, 4x4 patches)."""
    from fedtalora.config import LoraConfig, ModelConfig

    model_cfg = ModelConfig(
        backbone="vit_tiny_patch16_224", pretrained=False, kwargs={**TINY_MODEL_KWARGS, "depth": depth}
    )
    lora_cfg = LoraConfig(rank=rank, alpha=alpha, blocks=list(blocks), targets=list(targets))
    return model_cfg, lora_cfg


@pytest.fixture(scope="session")
def tiny_configs() -> Callable[..., tuple[Any, Any]]:
    """:func:`tiny_model_configs` as a fixture (keyword arguments as there)."""
    return tiny_model_configs


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., Any]:
    """Factory of tiny :class:`~fedtalora.model.FedModel` s (random init, CPU, 8x8 inputs).

    ``make_tiny_model(depth=2, blocks=(0, 1), targets=(...all four...), rank=4, alpha=8.0,
    num_classes=10, image_size=8, seed=0)``.
    """

    def make(*, num_classes: int = 10, image_size: int = 8, seed: int = 0, **kwargs: Any) -> Any:
        from fedtalora.model import build_model

        model_cfg, lora_cfg = tiny_model_configs(**kwargs)
        return build_model(model_cfg, lora_cfg, num_classes, image_size, seed)

    return make


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this one, plus the repo's ``src`` and offline mode."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("FORCE_COLOR", None)
    return env


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., tuple[int, str, str]]:
    """``run_cli(args, cwd)`` -> ``(returncode, stdout, stderr)`` of ``python -m fedtalora *args``."""

    def run(args: Sequence[str], cwd: str | Path | None = None, timeout: float = 300) -> tuple[int, str, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "fedtalora", *map(str, args)],
            cwd=str(cwd) if cwd is not None else None,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return proc.returncode, proc.stdout, proc.stderr

    return run


@pytest.fixture(autouse=True)
def _restore_root_logger():
    """In-process ``cli.main`` calls ``logging.basicConfig``; keep one test's handlers from leaking into
    the next."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
