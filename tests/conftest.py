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

import csv  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fedtalora.methods import SMOKE_OPTIONS  # noqa: E402

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
    """``key=value`` overrides (on top of the ``tiny-vit`` preset) for a run of a few seconds.

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


def _cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this one, plus the repo's ``src`` and offline mode."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("FORCE_COLOR", None)
    return env


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this one, plus the repo's ``src`` and offline mode (a copy per use:
    ``{**cli_env, "X": "y"}``)."""
    return _cli_env()


@pytest.fixture(scope="session")
def tiny_model_kwargs() -> dict[str, Any]:
    """``model.kwargs`` of the tiny ViT (embed 32, 2 heads, 4x4 patches, 2 blocks)."""
    return dict(TINY_MODEL_KWARGS)


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., tuple[int, str, str]]:
    """``run_cli(args, cwd)`` -> ``(returncode, stdout, stderr)`` of ``python -m fedtalora *args``."""

    def run(args: Sequence[str], cwd: str | Path | None = None, timeout: float = 300) -> tuple[int, str, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "fedtalora", *map(str, args)],
            cwd=str(cwd) if cwd is not None else None,
            env=_cli_env(),
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


# --- tiny text data and a tiny BERT (offline) ------------------------------------------------------

WORDS = ("card", "arrive", "lost", "stolen", "pin", "change", "top", "up", "fee", "refund", "exchange", "rate",
         "cash", "atm", "transfer", "pending", "my", "the", "is", "where", "how", "do", "i", "a", "why")
# 6 intents, each with its own keywords, so a tiny model can learn something.
INTENTS = {
    "card_arrival": ("card", "arrive", "where"),
    "lost_card": ("lost", "stolen", "card"),
    "change_pin": ("change", "pin", "how"),
    "top_up": ("top", "up", "how"),
    "refund": ("refund", "fee", "why"),
    "exchange_rate": ("exchange", "rate", "cash"),
}


def _sentences(intent: str, n: int, rng: np.random.Generator) -> list[str]:
    keys = INTENTS[intent]
    filler = ("my", "the", "is", "do", "i", "a")
    out = []
    for _ in range(n):
        words = list(rng.choice(keys, size=3)) + list(rng.choice(filler, size=int(rng.integers(1, 6))))
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a tiny random BERT config, tokenizer and weights (loadable by AutoModel)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(root))
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(root))
    return root


def _write_banking_files(root: Path, per_class: tuple[int, int] = (12, 4), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", per_class[0]), ("test.csv", per_class[1])):
        with (root / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            for intent in INTENTS:
                for s in _sentences(intent, n, rng):
                    w.writerow([s, intent])
    return root


@pytest.fixture(scope="session")
def write_banking() -> Callable[..., Path]:
    """``write_banking(root, per_class=(12, 4), seed=0)``: a Banking77-layout folder (train.csv, test.csv) of 6
    synthetic intents with their own keywords; returns ``root``."""
    return _write_banking_files


@pytest.fixture(scope="session")
def text_overrides() -> Callable[[Path, Path], list[str]]:
    """``text_overrides(bert_folder, data_folder)``: overrides of a 2-task text run on the tiny BERT."""
    return _text_run_overrides


def _text_run_overrides(bert: Path, data: Path) -> list[str]:
    return [
        "data.dataset=banking77", f"data.root={data}", "data.max_length=16",
        "scenario.num_tasks=2", "fed.num_clients=3", "fed.clients_per_round=3", "fed.rounds_per_task=2",
        "partition.kind=dirichlet", "partition.beta=0.5", "partition.min_samples=2",
        "train.local_epochs=1", "train.batch_size=8", "train.device=cpu", "train.optimizer=adamw",
        "train.lr=0.001", "train.head_lr=0.01",
        f"model.backbone=hf:{bert}", "model.pretrained=true", "model.kwargs={}",
        "lora.rank=2", "lora.blocks=[0,1]",
    ]


class _TextCorpus:
    """The synthetic intents of :func:`write_banking` (``intents``: name -> keywords) and their sentences."""

    intents = INTENTS
    words = WORDS

    @staticmethod
    def sentences(intent: str, n: int, rng: np.random.Generator) -> list[str]:
        return _sentences(intent, n, rng)


@pytest.fixture(scope="session")
def text_corpus() -> _TextCorpus:
    """The synthetic text corpus behind :func:`write_banking`."""
    return _TextCorpus()


# --- the documents of a finished run, and wrong-type edits of them ---------------------------------


@pytest.fixture(scope="session")
def run_documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every JSON document of a finished tiny run (``output.checkpoints=all``), its export's ``export.json``
    and the final model's metadata, parsed; ``run_dir`` is the run's folder (do not modify it)."""
    import json

    from safetensors import safe_open

    from fedtalora.api import run
    from fedtalora.app.export import export
    from fedtalora.config import resolve
    from fedtalora.fed.rundir import FINAL_MODEL, latest_path

    run_dir = tmp_path_factory.mktemp("documents") / "run"
    run(resolve("tiny-vit", [*TINY_OVERRIDES, "output.checkpoints=all"]), run_dir=run_dir)
    exported = export(run_dir)
    with safe_open(str(run_dir / FINAL_MODEL), framework="pt") as f:
        meta = dict(f.metadata())
    return {
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "checkpoint": json.loads(latest_path(run_dir).read_text()),  # type: ignore[union-attr]
        "first_checkpoint": json.loads((run_dir / "checkpoints" / "round-000001.json").read_text()),
        "partitions": json.loads((run_dir / "partitions.json").read_text()),
        "export": json.loads(exported.info.read_text()),
        "meta": meta,
        "run_dir": run_dir,
    }


class _WrongTypes:
    """Edits of a JSON document that put a value of another JSON type where a schema governs one."""

    @staticmethod
    def leaves(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Paths of every value in a document (containers included), depth first."""
        out = [path] if path else []
        if isinstance(doc, dict):
            for k, v in doc.items():
                out += _WrongTypes.leaves(v, (*path, k))
        elif isinstance(doc, list):
            for i, v in enumerate(doc):
                out += _WrongTypes.leaves(v, (*path, i))
        return out

    @staticmethod
    def governing(schema: Any, path: tuple[Any, ...]) -> Any:
        """The schema that governs ``path`` (None where the document is free-form)."""
        from fedtalora.schema import List, Map, Maybe, Obj

        for part in path:
            while isinstance(schema, Maybe):
                schema = schema.inner
            if isinstance(schema, Obj) and isinstance(part, str):
                schema = schema.fields.get(part)
            elif isinstance(schema, List) and isinstance(part, int):
                schema = schema.item
            elif isinstance(schema, Map) and isinstance(part, str):
                schema = schema.value
            else:
                return None
            if schema is None:
                return None
        while isinstance(schema, Maybe):
            schema = schema.inner
        return schema

    @staticmethod
    def wrong_value(schema: Any) -> Any:
        """A value of the wrong JSON type for ``schema``."""
        from fedtalora.schema import Float, Int, List, Map, Obj, Str

        if isinstance(schema, (Int, Float)):
            return "x"
        if isinstance(schema, Str):
            return 7
        if isinstance(schema, List):
            return {"not": "a list"}
        if isinstance(schema, (Obj, Map)):
            return [1, 2]
        return None  # bool: None is not a bool either

    @staticmethod
    def replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
        """A deep copy of ``doc`` with the value at ``path`` replaced."""
        import json

        doc = json.loads(json.dumps(doc))
        node = doc
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return doc

    def cases(self, doc: Any, schema: Any, seed: int, n: int = 40) -> list[tuple[tuple[Any, ...], Any]]:
        """``(path, edited doc)`` for up to ``n`` seeded schema-governed paths of ``doc``."""
        paths = [p for p in self.leaves(doc) if self.governing(schema, p) is not None]
        assert len(paths) > 5
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
        return [(paths[int(i)], self.replaced(doc, paths[int(i)], self.wrong_value(self.governing(schema, paths[int(i)]))))
                for i in picks]


@pytest.fixture(scope="session")
def wrong_types() -> _WrongTypes:
    """Wrong-type edits of JSON documents: ``wrong_types.cases(doc, schema, seed)`` -> ``[(path, edited), ...]``."""
    return _WrongTypes()


# --- small server budgets of the distillation baselines (a generator, the proxy's inversions) ------------


@pytest.fixture(scope="session")
def fast_method_options() -> Callable[[str], list[str]]:
    """``fast_method_options(method)``: overrides giving ``method`` a server budget of seconds on the tiny
    configuration (empty for methods without server-side training)."""
    return lambda name: list(SMOKE_OPTIONS.get(name, ()))



# --- a run crashed mid-way, then resumed --------------------------------------------------------------------


class _Crash(Exception):
    """Raised from a run's progress callback: a crash at a chosen round."""


@pytest.fixture(scope="session")
def crash_then_resume() -> Callable[..., dict[str, Any]]:
    """``crash_then_resume(cfg, run_dir, crash)``: run ``cfg`` until the round with global index ``crash``
    (``task * rounds_per_task + round``) starts reporting, raise there, then resume the run directory; returns
    the resumed run's metrics."""
    from fedtalora.api import run

    def go(cfg: Any, run_dir: Path, crash: int) -> dict[str, Any]:
        per_task = cfg.fed.rounds_per_task

        def progress(event: dict[str, Any]) -> None:
            if event["event"] == "round" and event["task"] * per_task + event["round"] == crash:
                raise _Crash

        with pytest.raises(_Crash):
            run(cfg, run_dir=run_dir, progress=progress)
        return run(cfg, run_dir=run_dir, resume=True).metrics

    return go
