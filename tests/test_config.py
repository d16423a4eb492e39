"""Tests of fedtalora.config: defaults, presets, overrides, extends, strict typing, ranges, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedtalora.config import (
    LORA_TARGETS,
    RunConfig,
    apply_overrides,
    from_dict,
    load_preset,
    parse_override,
    preset_description,
    preset_names,
    resolve,
)
from fedtalora.errors import ConfigError


def test_defaults_validate() -> None:
    cfg = RunConfig()
    assert cfg.validate() is cfg
    assert from_dict({}) == cfg
    assert cfg.fed.residual is True
    assert cfg.method == "fedtalora"
    assert cfg.lora.targets == list(LORA_TARGETS)
    assert cfg.lora.scaling == pytest.approx(cfg.lora.alpha / cfg.lora.rank)


def test_tiny_vit_preset_loads() -> None:
    assert "tiny-vit" in preset_names()
    assert preset_description("tiny-vit")
    cfg = resolve("tiny-vit")
    assert cfg.data.dataset == "digits"
    assert cfg.model.pretrained is False
    assert cfg.scenario.num_tasks == 5
    assert cfg.fed.num_clients == 5 and cfg.fed.clients_per_round == 5
    assert cfg.model.kwargs == {"patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3}
    assert isinstance(cfg.lora.alpha, float) and cfg.lora.alpha == 8.0  # YAML int coerced to float
    assert cfg.train.device == "cpu"


def test_overrides_parse_yaml_values(tiny_overrides: list[str]) -> None:
    cfg = resolve("tiny-vit", [
        "lora.blocks=[0, 2]", "lora.targets=[qkv,fc2]", "fed.residual=false", "train.lr=0.003",
        "train.head_lr=1", "model.kwargs={patch_size: 2, depth: 3}", "output.name=my run",
        "output.dir=C:/tmp/x", "seed=7", "fed.weighting=uniform", "model.checkpoint=",
    ])
    assert cfg.lora.blocks == [0, 2]
    assert cfg.lora.targets == ["qkv", "fc2"]
    assert cfg.fed.residual is False
    assert cfg.train.lr == pytest.approx(0.003)
    assert cfg.train.head_lr == 1.0 and isinstance(cfg.train.head_lr, float)  # int accepted for float
    assert cfg.model.kwargs == {"patch_size": 2, "depth": 3}  # a whole mapping replaces the preset's
    assert cfg.output.name == "my run"
    assert cfg.output.dir == "C:/tmp/x"  # unparseable / colon values stay strings
    assert cfg.seed == 7 and cfg.fed.weighting == "uniform"
    assert cfg.model.checkpoint == ""
    # A dotted key reaches into model.kwargs and keeps the preset's other entries.
    cfg = resolve("tiny-vit", ["model.kwargs.depth=2"])
    assert cfg.model.kwargs == {"patch_size": 4, "depth": 2, "embed_dim": 96, "num_heads": 3}
    # Later overrides win.
    assert resolve("tiny-vit", ["fed.rounds_per_task=2", "fed.rounds_per_task=4"]).fed.rounds_per_task == 4
    cfg = resolve("tiny-vit", tiny_overrides)
    assert cfg.model.kwargs == {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
    assert cfg.scenario.num_tasks == 2 and cfg.fed.num_clients == 3 and cfg.data.image_size == 8


def test_parse_override_basics() -> None:
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a= [1, 2]") == (["a"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=") == (["a"], "")
    for bad in ("novalue", "=1", "a..b=1", ".a=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)
    out = apply_overrides({"fed": {"num_clients": 3}}, ["fed.num_clients=4", "lora.rank=2"])
    assert out == {"fed": {"num_clients": 4}, "lora": {"rank": 2}}


def test_apply_overrides_does_not_modify_its_input() -> None:
    data = load_preset("tiny-vit")
    apply_overrides(data, ["fed.num_clients=4"])
    assert data["fed"]["num_clients"] == 5


def test_scientific_notation_float_override() -> None:
    assert resolve("tiny-vit", ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_extends_a_shipped_preset(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("extends: tiny-vit\nfed:\n  rounds_per_task: 7\nlora: {rank: 2}\n")
    cfg = resolve(str(child), ["fed.num_clients=6", "fed.clients_per_round=6"])
    demo = resolve("tiny-vit")
    assert cfg.fed.rounds_per_task == 7 and cfg.lora.rank == 2
    assert cfg.fed.num_clients == 6  # overrides apply on top of the file
    # Everything the child does not set comes from demo (deep merge inside sections).
    assert cfg.fed.residual == demo.fed.residual
    assert cfg.lora.blocks == demo.lora.blocks and cfg.lora.alpha == demo.lora.alpha
    assert cfg.data == demo.data and cfg.model == demo.model and cfg.train == demo.train


def test_extends_chain_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("extends: tiny-vit\nseed: 3\ntrain: {lr: 0.5}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "leaf.yaml").write_text("extends: ../base.yaml\ntrain: {head_lr: 0.25}\n")
    cfg = resolve(str(sub / "leaf.yaml"))
    assert cfg.seed == 3 and cfg.train.lr == 0.5 and cfg.train.head_lr == 0.25
    assert cfg.scenario.num_tasks == 5  # from demo


def test_extends_self_cycle_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="cycle"):
        load_preset("a.yaml")


def test_extends_cycle_by_path(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_preset(str(tmp_path / "a.yaml"))


def test_extends_must_be_a_string(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("extends: [tiny-vit]\n")
    with pytest.raises(ConfigError, match="extends"):
        load_preset(str(f))


def test_empty_yaml_file_is_the_defaults(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")
    assert resolve(str(f)) == RunConfig()


@pytest.mark.parametrize(("data", "suggestion"), [
    ({"fed": {"resdual": True}}, "residual"),
    ({"lora": {"rnak": 4}}, "rank"),
    ({"trian": {}}, "train"),
])
def test_unknown_key_suggests(data: dict, suggestion: str) -> None:
    with pytest.raises(ConfigError, match="did you mean") as exc:
        from_dict(data)
    msg = str(exc.value)
    assert "unknown config key" in msg
    assert suggestion in msg.split("did you mean", 1)[1]


def test_unknown_key_without_close_match_lists_allowed() -> None:
    with pytest.raises(ConfigError, match="allowed keys here") as exc:
        resolve("tiny-vit", ["fed.zzzzzz=1"])
    assert "fed.num_clients" in str(exc.value)


@pytest.mark.parametrize(("override", "key", "expected"), [
    ("fed.num_clients=abc", "fed.num_clients", "int"),        # string for int
    ("fed.num_clients='3'", "fed.num_clients", "int"),        # quoted number is a string
    ("fed.residual=1", "fed.residual", "bool"),               # int for bool
    ("data.download=yes please", "data.download", "bool"),
    ("train.batch_size=true", "train.batch_size", "int"),     # bool for int
    ("train.batch_size=2.0", "train.batch_size", "int"),      # float for int
    ("lora.rank=1.5", "lora.rank", "int"),
    ("train.lr=true", "train.lr", "float"),                   # bool for float
    ("train.lr=fast", "train.lr", "float"),
    ("lora.blocks=0", "lora.blocks", "list"),                 # scalar for list
    ("lora.blocks=[0, x]", "lora.blocks[1]", "int"),
    ("lora.targets=qkv", "lora.targets", "list"),
    ("model.kwargs=[1]", "model.kwargs", "dict"),
    ("model.backbone=5", "model.backbone", "str"),
    ("partition.kind=foo", "partition.kind", "one of iid, quantity, dirichlet"),
    ("train.precision=fp16", "train.precision", "fp32"),
    ("fed.weighting=equal", "fed.weighting", "samples"),
])
def test_wrong_types_rejected(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve("tiny-vit", [override])
    msg = str(exc.value)
    assert msg.startswith(key + "="), msg
    assert expected in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("override", "key"), [
    ("seed=-1", "seed"),
    ("data.image_size=0", "data.image_size"),
    ("scenario.num_tasks=0", "scenario.num_tasks"),
    ("partition.alpha=0", "partition.alpha"),
    ("partition.beta=0", "partition.beta"),
    ("partition.beta=-1", "partition.beta"),
    ("partition.min_samples=0", "partition.min_samples"),
    ("partition.max_redraws=0", "partition.max_redraws"),
    ("fed.num_clients=0", "fed.num_clients"),
    ("fed.clients_per_round=0", "fed.clients_per_round"),
    ("fed.clients_per_round=6", "fed.clients_per_round"),  # demo has 5 clients
    ("fed.rounds_per_task=0", "fed.rounds_per_task"),
    ("train.local_epochs=0", "train.local_epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("train.lr=-0.1", "train.lr"),
    ("train.head_lr=-1", "train.head_lr"),
    ("train.momentum=1", "train.momentum"),
    ("train.weight_decay=-0.0001", "train.weight_decay"),
    ("train.device=tpu", "train.device"),
    ("train.device=cuda:x", "train.device"),
    ("lora.rank=0", "lora.rank"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.dropout=1", "lora.dropout"),
    ("lora.blocks=[]", "lora.blocks"),
    ("lora.blocks=[-1]", "lora.blocks"),
    ("lora.blocks=[1, 1]", "lora.blocks"),
    ("lora.targets=[qkv,foo]", "lora.targets"),
    ("lora.targets=[]", "lora.targets"),
    ("lora.targets=[fc1, fc1]", "lora.targets"),
])
def test_out_of_range_rejected_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve("tiny-vit", [override])
    msg = str(exc.value)
    assert msg.startswith(key + "="), msg
    assert "invalid" in msg


def test_valid_edge_values_accepted() -> None:
    cfg = resolve("tiny-vit", ["train.device=cuda:1", "train.momentum=0", "lora.dropout=0.5", "train.lr=0",
                           "fed.clients_per_round=5", "partition.beta=0.001", "lora.blocks=[3, 0]"])
    assert cfg.train.device == "cuda:1" and cfg.lora.blocks == [3, 0]


@pytest.mark.parametrize(("method", "match"), [("nope", "unknown method 'nope'"),
                                               ("future", "planned but not implemented")])
def test_method_must_be_implemented(method: str, match: str, monkeypatch) -> None:
    from fedtalora.methods import METHODS

    monkeypatch.setitem(METHODS._planned, "future", "a method listed before it exists")
    from fedtalora.fed.build import check_config

    cfg = resolve("tiny-vit", [f"method={method}"])  # the config knows no methods: the registry checks the name
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


def test_preset_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny-vit"):
        resolve("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("fed: {num_clients: 3\n  x: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+\)"):
        resolve(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must contain a YAML mapping, got list"):
        resolve(str(lst))
    section = tmp_path / "section.yaml"
    section.write_text("fed: 3\n")
    with pytest.raises(ConfigError, match="fed must be a mapping"):
        resolve(str(section))
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        resolve("tiny-vit", ["seed.x=1"])


def test_round_trip_through_yaml(tiny_overrides: list[str]) -> None:
    for cfg in (RunConfig(), resolve("tiny-vit"), resolve("tiny-vit", [*tiny_overrides, "fed.residual=false",
                                                               "lora.targets=[fc2, qkv]", "seed=11"])):
        text = cfg.to_yaml()
        data = yaml.safe_load(text)
        assert data == cfg.to_dict()
        back = from_dict(data)
        assert back == cfg
        assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
        assert back.to_yaml() == text


def test_the_speed_keys_parse_from_overrides_and_are_validated() -> None:
    """``train.parallel_clients``, ``feature_cache``, ``feature_cache_mb``, ``compile``, ``fused_attention`` (issue 20):
    the words a user types on the command line (``none``, not YAML's ``off`` = false) and their ranges."""
    cfg = resolve("tiny-vit", ["train.parallel_clients=4", "train.feature_cache=host", "train.feature_cache_mb=512",
                           "train.compile=none", "train.fused_attention=false"])
    t = cfg.train
    assert (t.parallel_clients, t.feature_cache, t.feature_cache_mb, t.compile, t.fused_attention) == (
        4, "host", 512, "none", False)
    assert resolve("tiny-vit", []).train.feature_cache == "none" and resolve("tiny-vit", []).train.parallel_clients == 1
    for bad, key in (("train.parallel_clients=0", "train.parallel_clients"), ("train.feature_cache_mb=0",
                     "train.feature_cache_mb"), ("train.feature_cache=yes", "train.feature_cache"),
                     ("train.compile=fast", "train.compile")):
        with pytest.raises(ConfigError, match=key):
            resolve("tiny-vit", [bad])
