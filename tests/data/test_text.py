"""Text backbones (transformers encoders + peft LoRA) and text datasets, all offline and tiny."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtalora.config import LoraConfig, ModelConfig
from fedtalora.data import load_dataset
from fedtalora.errors import ConfigError, DataError

# --- datasets -------------------------------------------------------------------------------------


def test_banking77_layout(tmp_path: Path, write_banking, text_corpus) -> None:
    root = write_banking(tmp_path / "b77")
    ds = load_dataset("banking77", root, seed=0)
    assert ds.modality == "text"
    assert ds.class_names == sorted(text_corpus.intents)
    assert len(ds.train) == 6 * 12 and len(ds.test) == 6 * 4
    assert np.bincount(ds.train.labels).tolist() == [12] * 6
    # stable mapping across runs and seeds
    again = load_dataset("banking77", root, seed=5)
    assert again.class_names == ds.class_names
    np.testing.assert_array_equal(again.train.labels, ds.train.labels)
    with (root / "train.csv").open() as f:
        first = next(iter(csv.DictReader(f)))
    assert ds.train.inputs[0] == first["text"]
    assert ds.class_names[ds.train.labels[0]] == first["category"]


def test_clinc150_layout(tmp_path: Path, text_corpus) -> None:
    rng = np.random.default_rng(1)
    data = {
        "train": [[s, i] for i in text_corpus.intents for s in text_corpus.sentences(i, 5, rng)],
        "val": [[s, i] for i in text_corpus.intents for s in text_corpus.sentences(i, 2, rng)],
        "test": [[s, i] for i in text_corpus.intents for s in text_corpus.sentences(i, 3, rng)],
        "oos_train": [["what is love", "oos"]], "oos_val": [], "oos_test": [["hello", "oos"]],
    }
    (tmp_path / "data_full.json").write_text(json.dumps(data))
    ds = load_dataset("clinc150", tmp_path, seed=0)
    assert ds.num_classes == 6 and "oos" not in ds.class_names
    assert (len(ds.train), len(ds.test)) == (30, 18)
    with_val = load_dataset("clinc150", tmp_path, seed=0, use_val=True)
    assert len(with_val.train) == 42


def test_text_csv_single_file_split_is_seeded(tmp_path: Path, text_corpus) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "all.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["utterance", "intent"])
        for intent in text_corpus.intents:
            for s in text_corpus.sentences(intent, 10, rng):
                w.writerow([s, intent])
    a = load_dataset("text-csv", path, seed=3, text_column="utterance", label_column="intent")
    b = load_dataset("text-csv", path, seed=3, text_column="utterance", label_column="intent")
    c = load_dataset("text-csv", path, seed=4, text_column="utterance", label_column="intent")
    assert len(a.train) == 48 and len(a.test) == 12
    assert np.bincount(a.test.labels).tolist() == [2] * 6
    assert a.test.inputs == b.test.inputs
    assert a.test.inputs != c.test.inputs


@pytest.mark.parametrize("case", ["missing", "no-column", "empty-label", "bad-json", "not-pairs", "unseen-test"])
def test_malformed_text_files(tmp_path: Path, case: str, write_banking) -> None:
    root = tmp_path / "d"
    name = "banking77"
    if case == "missing":
        root.mkdir()
        match = "download train.csv and test.csv"
    elif case == "no-column":
        write_banking(root)
        (root / "train.csv").write_text("text,label\nhello,a\n")
        match = "no column 'category'"
    elif case == "empty-label":
        write_banking(root)
        (root / "test.csv").write_text("text,category\nhello,\n")
        match = "test.csv:2: missing"
    elif case == "unseen-test":
        write_banking(root)
        (root / "test.csv").write_text("text,category\nhello,brand_new\n")
        match = "not in the training data: brand_new"
    elif case == "bad-json":
        name = "clinc150"
        root.mkdir()
        (root / "data_full.json").write_text("{not json")
        match = "is not valid JSON"
    else:
        name = "clinc150"
        root.mkdir()
        (root / "data_full.json").write_text(json.dumps({"train": [["a", "b", "c"]], "test": []}))
        match = r"train\[0\] is not a \[text, intent\] pair"
    with pytest.raises(DataError, match=match) as info:
        load_dataset(name, root, seed=0)
    assert "\n" not in str(info.value)


def test_unknown_loader_option_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="takes no option 'colour'.*text_column"):
        load_dataset("text-csv", tmp_path, seed=0, colour="red")


def test_tokens_index_and_trim(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    from fedtalora.data import Split
    from fedtalora.data.transforms import TextTransform, tokenize_split

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    split = tokenize_split(Split(["card", "where is my card my card", "pin"], np.array([0, 1, 2])), tok, 6)
    t = split.inputs
    assert t.input_ids.shape == (3, 6)  # truncated to max_length
    assert t.lengths.tolist() == [3, 6, 3]
    batch = t[torch.tensor([0, 2])].to("cpu")
    assert batch.input_ids.shape == (2, 3)  # trimmed to the batch's longest sequence
    x = TextTransform()(batch, train=True)
    assert x["input_ids"].dtype == torch.long and x["attention_mask"].sum().item() == 6


# --- model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("blocks", "targets", "expected_per_block"), [
    ([0, 1], ["qkv", "proj", "fc1", "fc2"],
     ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
      "intermediate.dense", "output.dense"]),
    ([1], ["qkv"], ["attention.self.query", "attention.self.key", "attention.self.value"]),
    ([0], ["proj", "fc2"], ["attention.output.dense", "output.dense"]),
])
def test_lora_placement_on_bert(tiny_bert: Path, blocks: list[int], targets: list[str],
                                expected_per_block: list[str]) -> None:
    from fedtalora.model import build_model

    model = build_model(ModelConfig(backbone=f"hf:{tiny_bert}", pretrained=True),
                        LoraConfig(rank=2, alpha=2, blocks=blocks, targets=targets), 6, 224, 0)
    adapted = sorted(p.layer for p in model.lora_pairs())
    expected = sorted(f"backbone.model.encoder.layer.{b}.{sub}" for b in blocks for sub in expected_per_block)
    assert adapted == expected
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert model.spec.modality == "text" and model.spec.num_features == 32


def test_pretrained_weights_are_loaded(tiny_bert: Path) -> None:
    from safetensors.torch import load_file

    from fedtalora.model import build_model

    model = build_model(ModelConfig(backbone=f"hf:{tiny_bert}", pretrained=True), LoraConfig(rank=2, blocks=[0]),
                        6, 224, 0)
    saved = load_file(str(tiny_bert / "model.safetensors"))
    key = next(k for k in saved if k.endswith("layer.1.output.dense.weight"))
    got = model.backbone.model.get_parameter(key.removeprefix("bert."))
    torch.testing.assert_close(got, saved[key], rtol=0, atol=0)
    random = build_model(ModelConfig(backbone=f"hf:{tiny_bert}", pretrained=False), LoraConfig(rank=2, blocks=[0]),
                         6, 224, 0)
    assert not torch.equal(random.backbone.model.get_parameter(key.removeprefix("bert.")), saved[key])


def test_masked_mean_pooling_ignores_padding(tiny_bert: Path) -> None:
    from fedtalora.model import build_model

    model = build_model(ModelConfig(backbone=f"hf:{tiny_bert}", pretrained=True), LoraConfig(rank=2, blocks=[0]),
                        6, 224, 0).eval()
    ids = torch.tensor([[2, 5, 6, 3]])
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0, 0]])}
    with torch.no_grad():
        torch.testing.assert_close(model.features(short), model.features(padded), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone,match", [
    ("hf:", "needs a hub id or a local folder"),
    ("hf:/nonexistent/bert-folder-xyz", "cannot fetch /nonexistent/bert-folder-xyz"),
])
def test_bad_text_backbones(backbone: str, match: str) -> None:
    from fedtalora.errors import FedTaLoRAError
    from fedtalora.model import build_model

    with pytest.raises(FedTaLoRAError, match=match):
        build_model(ModelConfig(backbone=backbone), LoraConfig(rank=2, blocks=[0]), 6, 224, 0)


# --- end to end ------------------------------------------------------------------------------------


def test_text_run_end_to_end_through_cli(tiny_bert: Path, tmp_path: Path, run_cli, write_banking, text_overrides) -> None:
    data = write_banking(tmp_path / "b77")
    rc, out, err = run_cli(["run", "tiny-vit", *text_overrides(tiny_bert, data), f"output.dir={tmp_path}",
                            "output.name=text", "--quiet"])
    assert rc == 0, err
    metrics = json.loads((tmp_path / "text" / "metrics.json").read_text())
    assert metrics["complete"]
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["accuracy_matrix"][0][1] is None
    assert len(metrics["rounds"]) == 4
    assert max(r["aggregation_error_rounding"] for r in metrics["rounds"]) <= 2  # exact to float32 resolution
    assert max(r["aggregation_error_accumulated_rounding"] for r in metrics["rounds"]) <= 2
    assert all(r["uplink_bytes"] > 0 for r in metrics["rounds"])
    assert 0.0 <= metrics["final_average_accuracy"] <= 1.0


def test_image_data_with_text_model_is_a_config_error(tiny_bert: Path, tmp_path: Path, run_cli) -> None:
    rc, out, err = run_cli(["run", "tiny-vit", f"model.backbone=hf:{tiny_bert}", "model.kwargs={}",
                            f"output.dir={tmp_path}", "--quiet"])
    assert rc == 2
    assert "is image data but model.backbone" in err and len(err.strip().splitlines()) == 1


def test_group_by_length_batches_cover_every_sample_once() -> None:
    from fedtalora.fed.client import batches
    from fedtalora.seeding import torch_generator

    lengths = torch.randint(1, 60, (1000,), generator=torch.Generator().manual_seed(0))
    plain = list(batches(1000, 8, torch_generator(0, "x")))
    grouped = list(batches(1000, 8, torch_generator(0, "x"), lengths))
    assert sorted(torch.cat(grouped).tolist()) == list(range(1000))
    assert all(len(b) <= 8 for b in grouped)

    def padded(batches: list[torch.Tensor]) -> int:
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    assert padded(grouped) < 0.75 * padded(plain)  # far less padding
    again = list(batches(1000, 8, torch_generator(0, "x"), lengths))
    assert all(torch.equal(a, b) for a, b in zip(grouped, again, strict=True))
