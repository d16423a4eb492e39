"""The final model on disk (state.py) and its export (export.py): both exported forms predict exactly
what the run's final global model predicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedtalora.api import prepare, run
from fedtalora.app.cli import main
from fedtalora.app.export import ADAPTER, BASE, INFO, MERGED, export, load_adapter, load_merged
from fedtalora.config import resolve
from fedtalora.errors import ModelError
from fedtalora.fed.rundir import FINAL_MODEL, final_state, load_final


@pytest.fixture(scope="module")
def tiny_run(tiny_overrides, tmp_path_factory) -> dict[str, Any]:
    """A finished tiny run (2 tasks x 2 rounds, residual on), its final model and real test inputs."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    cfg = resolve("tiny-vit", [*tiny_overrides, "output.checkpoints=none"])
    setup = prepare(cfg)
    result = run(setup, run_dir=run_dir)
    test = setup.exp.dataset.test
    x = setup.transform(test.inputs[:64], train=False)
    model = result.model.eval()
    # The run really changed the frozen base (the residual) and the LoRA factors (B starts at zero).
    fresh = prepare(cfg).model
    pair = model.lora_pairs()[0]
    assert not torch.equal(model.base_weight(pair.layer), fresh.base_weight(pair.layer))
    assert model.lora_parameters()[pair.b_key].abs().sum() > 0
    return {"run_dir": run_dir, "model": model, "x": x, "metrics": result.metrics}


@torch.no_grad()
def _logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.eval()(x)


def test_final_model_written_and_reloads_bit_exact(tiny_run) -> None:
    run_dir, model = tiny_run["run_dir"], tiny_run["model"]
    assert (run_dir / FINAL_MODEL).is_file()
    reloaded = load_final(run_dir)
    a, b = final_state(model), final_state(reloaded)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(model, tiny_run["x"]), _logits(reloaded, tiny_run["x"]))


def test_final_model_restores_the_exact_base(tiny_run, tmp_path) -> None:
    """The final model carries the float64 accumulator D (format 2): a reloaded run holds the same W0 + D, so
    export writes the exact weights; a corrupted D is refused; a final model of format 1 (no D) still loads,
    with D = b - W0."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run_dir, model = tiny_run["run_dir"], tiny_run["model"]
    reloaded = load_final(run_dir)
    layers = [p.layer for p in model.lora_pairs()]
    assert reloaded.exact_base is not None and set(reloaded.exact_base.acc) == set(layers)
    for layer in layers:
        assert torch.equal(reloaded.exact_base.acc[layer], model.exact_base.acc[layer])
        assert torch.equal(reloaded.exact_base.w0[layer], model.exact_base.w0[layer])
        assert torch.equal(reloaded.exact_weight(layer), model.exact_weight(layer))
    tensors = load_file(str(run_dir / FINAL_MODEL))
    with safe_open(str(run_dir / FINAL_MODEL), framework="pt") as f:
        meta = dict(f.metadata())
    assert meta["format"] == "fedtalora-final-2"
    assert {k for k in tensors if k.startswith("exact/")} == {f"exact/{layer}" for layer in layers}

    def rewrite(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
        other = tmp_path / name
        shutil.copytree(run_dir, other)
        save_file(tensors, str(other / FINAL_MODEL), metadata=meta)
        return other

    bad = dict(tensors)
    bad[f"exact/{layers[0]}"] = bad[f"exact/{layers[0]}"] + 1e-3
    with pytest.raises(ModelError, match="does not round to its stored base weight"):
        load_final(rewrite("bad", bad, meta))
    v1 = {k: v for k, v in tensors.items() if not k.startswith("exact/")}
    old = load_final(rewrite("v1", v1, {**meta, "format": "fedtalora-final-1"}))
    for layer in layers:
        assert torch.equal(old.base_weight(layer), model.base_weight(layer))
        assert torch.equal(old.exact_base.acc[layer],
                           model.base_weight(layer).double() - model.exact_base.w0[layer].double())


def test_export_writes_the_exact_merged_weights(tiny_run, tmp_path) -> None:
    """``model.safetensors`` holds, per adapted layer, W0 + D + s B A computed in float64 from the reloaded
    run and rounded once to float32 (not the float32 base plus a float32 LoRA product)."""
    from safetensors.torch import load_file

    model = tiny_run["model"]
    out = export(tiny_run["run_dir"], tmp_path / "exact").out
    merged = load_file(str(out / MERGED))
    params = model.lora_parameters()
    for p in model.lora_pairs():
        w0, d = model.exact_base.w0[p.layer].double(), model.exact_base.acc[p.layer]
        exact = w0 + d + p.scaling * (params[p.b_key].detach().double() @ params[p.a_key].detach().double())
        got = merged[f"{p.layer.removeprefix('backbone.')}.weight"]
        assert got.dtype == torch.float32
        assert ((got.double() - exact).abs() <= 2.0 ** -24 * exact.abs() + 1e-300).all(), p.layer  # one rounding
        assert torch.equal(got, exact.float()), p.layer


def test_export_both_forms_predict_like_the_final_model(tiny_run, tmp_path) -> None:
    model, x = tiny_run["model"], tiny_run["x"]
    res = export(tiny_run["run_dir"], tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {MERGED, BASE, ADAPTER, INFO}
    reference = _logits(model, x)
    merged = _logits(load_merged(res.out), x)
    adapted = _logits(load_adapter(res.out), x)
    for logits in (merged, adapted):
        assert logits.shape == reference.shape
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(1), reference.argmax(1))
    assert torch.equal(adapted, reference)  # the adapter computes exactly what the run's model computes
    assert res.max_diff["merged"] < 1e-4


def test_export_loads_with_the_documented_plain_calls(tiny_run, tmp_path) -> None:
    """Only timm, safetensors and peft: what a user outside fedtalora writes (export.py's docstring)."""
    import timm
    from peft import PeftModel
    from safetensors.torch import load_file

    out = export(tiny_run["run_dir"], tmp_path / "plain").out
    info = json.loads((out / "export.json").read_text())
    reference = _logits(tiny_run["model"], tiny_run["x"])

    net = timm.create_model(info["backbone"], pretrained=False, **info["timm_kwargs"])
    net.load_state_dict(load_file(str(out / "model.safetensors")))
    assert torch.equal(_logits(net, tiny_run["x"]).argmax(1), reference.argmax(1))

    base = timm.create_model(info["backbone"], pretrained=False, **info["timm_kwargs"])
    base.load_state_dict(load_file(str(out / "base_model.safetensors")))
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert torch.equal(_logits(peft_model, tiny_run["x"]), reference)
    # Without the adapter the base alone is a different model: the LoRA part matters.
    with peft_model.disable_adapter():
        assert not torch.allclose(_logits(peft_model, tiny_run["x"]), reference)


def test_export_json_describes_the_model(tiny_run, tmp_path) -> None:
    out = export(tiny_run["run_dir"], tmp_path / "info").out
    info = json.loads((out / INFO).read_text())
    m = tiny_run["metrics"]
    assert info["class_order"] == [c for task in m["tasks"] for c in task["classes"]]
    assert info["num_classes"] == 10 == info["timm_kwargs"]["num_classes"]
    assert info["image_size"] == 8
    assert len(info["lora"]["layers"]) == len(tiny_run["model"].lora_pairs())


def test_export_cli_default_folder(tiny_run, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    assert main(["export", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert str(run_dir / "export" / MERGED) in out and "self-check" in out
    assert (run_dir / "export" / ADAPTER / "adapter_config.json").is_file()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedtalora: error: "), err
    return lines[0]


def test_export_of_a_run_without_final_model_is_one_line(tiny_run, tmp_path, capsys) -> None:
    run_dir = tmp_path / "unfinished"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    (run_dir / FINAL_MODEL).unlink()
    assert main(["export", str(run_dir)]) == 2
    assert FINAL_MODEL in _one_line_error(capsys)
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in _one_line_error(capsys)


def test_a_backbone_that_rebuilds_differently_is_refused(tiny_run, tmp_path, capsys) -> None:
    """Another seed initialises the random backbone differently: the fingerprint must catch it."""
    run_dir = tmp_path / "tampered"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["seed"] = cfg["seed"] + 1
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelError, match="differs"):
        load_final(run_dir)
    assert main(["export", str(run_dir)]) == 2
    assert "differs" in _one_line_error(capsys)


def test_a_corrupted_final_model_is_one_line(tiny_run, tmp_path, capsys) -> None:
    run_dir = tmp_path / "corrupt"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    path: Path = run_dir / FINAL_MODEL
    path.write_bytes(path.read_bytes()[:100])
    assert main(["export", str(run_dir)]) == 2
    assert "not a readable safetensors file" in _one_line_error(capsys)


def _methods() -> list[str]:
    from fedtalora.methods import METHODS

    return METHODS.names()


@pytest.mark.parametrize("method", _methods())
def test_every_method_exports_or_refuses_in_one_line(method, tiny_overrides, tmp_path, capsys) -> None:
    """Methods with a linear head (whatever they train: LoRA, B only, head only, the whole backbone) export
    models that predict like the run's; a method with its own logits is refused before any file is written."""
    from fedtalora.methods import METHODS

    cfg = resolve("tiny-vit", [*tiny_overrides, f"method={method}", "output.checkpoints=none"])
    setup = prepare(cfg)
    result = run(setup, run_dir=tmp_path / "run")
    x = setup.transform(setup.exp.dataset.test.inputs[:32], train=False)
    reference = _logits(result.model, x)
    reloaded = load_final(tmp_path / "run")
    assert torch.equal(_logits(reloaded, x), reference)
    if not METHODS.get(method).predicts_with_head:
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
        assert "computes its logits its own way" in _one_line_error(capsys)
        assert not (tmp_path / "out").exists()
        return
    out = export(tmp_path / "run", tmp_path / "out").out
    for net in (load_merged(out), load_adapter(out)):
        logits = _logits(net, x)
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(1), reference.argmax(1))


def test_export_is_staged_then_swapped_in(tiny_run, tmp_path, capsys, monkeypatch) -> None:
    """A re-export replaces the previous one only once it is complete and checked; a failed export leaves the
    previous one (and no temporary folder); an --out holding anything else is refused, nothing replaced."""
    import fedtalora.app.export as export_module

    out = tmp_path / "out"
    first = export(tiny_run["run_dir"], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def broken(reference: torch.nn.Module, other: torch.nn.Module, x: torch.Tensor) -> float:
        raise ModelError("export self-check: logits differ by up to 1")

    monkeypatch.setattr(export_module, "_max_diff", broken)
    assert main(["export", str(tiny_run["run_dir"]), "--out", str(out)]) == 2
    assert "logits differ" in _one_line_error(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the previous export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    monkeypatch.undo()
    again = export(tiny_run["run_dir"], out)
    assert again.max_diff.keys() == first.max_diff.keys() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_run["run_dir"]), "--out", str(out)]) == 2
    assert "'notes.txt', which an export does not write" in _one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "mine" and (out / MERGED).is_file()
