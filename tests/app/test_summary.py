"""The end-of-run summary: what ran, the metrics, and precomputed reference lines shown only beside the run
they describe."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from fedtalora.app.summary import (
    comparable_config,
    data_facts,
    describe_run,
    find_reference,
    format_summary,
    reference_rows,
)
from fedtalora.config import resolve
from fedtalora.data.text import banking77_demo_path
from fedtalora.fed.history import History, RoundRecord


def _history(**kw: Any) -> History:
    h = History(backbone="minilm", pretrained=True, final_average_accuracy=0.8312, average_incremental_accuracy=0.88,
                forgetting=0.05, max_aggregation_error=1e-7, uplink_bytes_total=3000,
                downlink_bytes_total=9_000_000, trainable_parameters=123456, wall_seconds=61.2,
                rounds=[RoundRecord(task=0, round=r) for r in range(3)], reliability={"dropped_clients": 0})
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def _reference(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"config": cfg, "source": "benchmarks/demo_reference.py, seed 0",
            "lines": [{"label": "frozen backbone", "final_average_accuracy": 0.8, "average_incremental_accuracy": 0.85},
                      {"label": "centralized ceiling", "final_average_accuracy": 0.9}]}


def test_data_facts_hand_example() -> None:
    f = data_facts("x", 3, [0, 0, 1, 2, 2, 2], [1, 1], "text")
    assert f.train_counts == (2, 1, 3) and f.test_counts == (0, 2, 0) and f.modality == "text"


def test_describe_the_demo() -> None:
    cfg = resolve("demo").to_dict()
    rows = dict(describe_run(cfg, data_facts("banking77-demo", 77, [c for c in range(77) for _ in range(16)],
                                             [c for c in range(77) for _ in range(8)], "text"), True))
    assert rows["model"] == "all-MiniLM-L6-v2 (pre-trained, frozen)"
    assert "Banking77" in rows["data"] and "CC BY 4.0" in rows["data"]
    assert "77 classes, 16 train / 8 test utterances per class" in rows["data"]
    assert "7 tasks x 11 classes" in rows["data"]
    fed = cfg["fed"]
    assert f"{fed['num_clients']} clients ({fed['clients_per_round']} per round)" in rows["federation"]
    assert f"Dirichlet(beta={cfg['partition']['beta']:g}) non-IID" in rows["federation"]
    assert f"Dirichlet(beta={cfg['partition']['beta']:g}) non-IID; 1 round x 1 local epoch per task" in rows["federation"]
    assert rows["method"].startswith("fedtalora, LoRA rank 4 in layers 0-2 (qkv, proj, fc1, fc2), residual on")
    assert rows["method"].endswith("classifier: exact federated ridge (analytic)")


def test_describe_uneven_counts_and_frozen_backbone() -> None:
    cfg = resolve("demo", ["method=head-only", "partition.kind=iid"]).to_dict()
    rows = dict(describe_run(cfg, data_facts("mine", 2, [0, 1, 1], [0, 1]), False))
    assert "1-2 train / 1 test samples per class" in rows["data"] and rows["data"].startswith("mine:")
    assert "LoRA" not in rows["method"] and "IID" in rows["federation"]
    assert "NOT pretrained" in rows["model"]
    cfg = resolve("tiny-vit", ["fed.rounds_per_task=2", "lora.blocks=[0,2]"]).to_dict()
    rows = dict(describe_run(cfg, data_facts("digits", 2, [0, 1], [0, 1]), True))
    assert "2 rounds x 3 local epochs per task" in rows["federation"] and "in blocks 0, 2 (" in rows["method"]


def test_comparable_config_ignores_only_where_and_how_fast() -> None:
    base = resolve("demo").to_dict()
    same = resolve("demo", ["output.dir=/elsewhere", "output.name=x", "train.threads=2"]).to_dict()
    assert comparable_config(base) == comparable_config(same)
    assert comparable_config(base) != comparable_config(resolve("demo", ["seed=1"]).to_dict())
    assert comparable_config(base) != comparable_config(resolve("demo", ["train.lr=0.5"]).to_dict())
    assert "output" in base  # the input is not modified


def test_find_reference_matches_the_config_only(tmp_path: Path) -> None:
    cfg = resolve("demo").to_dict()
    (tmp_path / "a.reference.json").write_text(json.dumps(_reference(resolve("demo", ["seed=3"]).to_dict())))
    (tmp_path / "b.reference.json").write_text("{not json")
    (tmp_path / "c.reference.json").write_text(json.dumps(_reference(cfg)))
    (tmp_path / "d.json").write_text(json.dumps(_reference(cfg) | {"source": "not a reference file"}))
    ref = find_reference(resolve("demo", ["output.dir=/tmp/x"]).to_dict(), tmp_path)
    assert ref is not None and ref["source"].startswith("benchmarks/")
    assert find_reference(resolve("demo", ["fed.residual=false"]).to_dict(), tmp_path) is None
    assert find_reference(cfg, tmp_path / "missing") is None


def test_a_reference_older_than_a_config_key_matches_its_default_only(tmp_path: Path) -> None:
    """A key added after the reference was measured (here ``data.val_fraction``) compares as today's default:
    the reference still matches a run at the default and not a run that sets the key otherwise."""
    old = resolve("demo").to_dict()
    del old["data"]["val_fraction"]
    (tmp_path / "old.reference.json").write_text(json.dumps(_reference(old)))
    assert find_reference(resolve("demo").to_dict(), tmp_path) is not None
    assert find_reference(resolve("demo", ["data.val_fraction=0.1"]).to_dict(), tmp_path) is None
    assert find_reference(resolve("demo", ["train.feature_cache_dir=/elsewhere"]).to_dict(), tmp_path) is not None


def test_summary_puts_reference_lines_beside_faa() -> None:
    cfg = resolve("demo").to_dict()
    data = data_facts("banking77-demo", 2, [0, 1], [0, 1], "text")
    text = format_summary(_history(), "runs/x", cfg, data, _reference(cfg))
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("final average accuracy (F_AA)"))
    assert lines[i].split()[-1] == "0.8312"
    assert lines[i + 1].split() == ["frozen", "backbone", "(precomputed)", "0.8000", "(AIA", "0.8500)"]
    assert lines[i + 2].split() == ["centralized", "ceiling", "(precomputed)", "0.9000"]
    assert lines[i + 3].startswith("average incremental accuracy")
    assert "(precomputed: benchmarks/demo_reference.py, seed 0)" in text
    assert lines[0].startswith("model") and lines[-1] == "run directory: runs/x"
    plain = format_summary(_history(), "runs/x")
    assert "precomputed" not in plain and "model " not in plain and "final average accuracy (F_AA)" in plain
    assert "forgetting" in plain and "3.0 MB" in plain  # downlink per round: 9 MB / 3 rounds


@pytest.mark.parametrize("ref", [None, {}, {"lines": [{"label": "x"}]}])
def test_reference_rows_tolerate_empty(ref: Any) -> None:
    assert reference_rows(ref) == []


def test_shipped_reference_matches_the_demo_preset() -> None:
    """The precomputed lines of the demo are printed only if they were measured with its current config:
    regenerate them (benchmarks/demo_reference.py) whenever the preset or its data change."""
    ref = find_reference(resolve("demo").to_dict())
    assert ref is not None, "the demo preset changed: rerun benchmarks/demo_reference.py"
    labels = [line["label"] for line in ref["lines"]]
    assert any("frozen" in s for s in labels) and any("centralized" in s for s in labels)
    assert all(0.0 <= line["final_average_accuracy"] <= 1.0 for line in ref["lines"])
    folder = banking77_demo_path()
    assert ref["data_sha256"] == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                                  for name in ("train.csv", "test.csv")}, "the demo data changed: rerun it"
