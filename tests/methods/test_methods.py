"""Methods: every registered method runs through the one loop, and each does what makes it itself.

The smoke test is parametrised over the registry, so a newly registered method is exercised without
editing this file. The per-method tests check the defining property (which tensors move, what the
server computes, what stays frozen), on the tiny 2-task x 2-round configuration of ``conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtalora.api import prepare, run
from fedtalora.config import resolve
from fedtalora.core.aggregation import normalize_weights, weighted_average
from fedtalora.errors import ConfigError
from fedtalora.fed.build import build_method, check_config
from fedtalora.fed.history import without_timing
from fedtalora.fed.rundir import load_final
from fedtalora.methods import METHODS, Method
from fedtalora.methods.fedprox import proximal_term
from fedtalora.methods.finetune import RunningMean
from fedtalora.methods.pilora import (
    class_sums,
    pilora_client_weights,
    pooled_prototypes,
    prototype_distance,
    reweighted_prototypes,
)
from fedtalora.methods.prompt import PromptPool, select_and_match
from fedtalora.model import build_model

SCHEMA = ("method", "seed", "complete", "accuracy_matrix", "rounds", "tasks", "trainable_parameters",
          "final_average_accuracy", "average_incremental_accuracy", "forgetting", "seen_accuracy",
          "uplink_bytes_total", "downlink_bytes_total", "max_aggregation_error", "max_aggregation_error_rounding",
          "max_aggregation_error_accumulated", "max_aggregation_error_accumulated_rounding", "wall_seconds")


def _cfg(tiny_overrides: list[str], *extra: str) -> Any:
    return resolve("tiny-vit", [*tiny_overrides, *extra])


def _fresh_model(cfg: Any) -> Any:
    """The model a run of ``cfg`` starts from (same seed, same init), on the CPU."""
    setup = prepare(cfg)
    return setup.model


@pytest.fixture(scope="module")
def runs(tiny_overrides, fast_method_options, tmp_path_factory) -> dict[str, Any]:
    """One tiny run per implemented method (shared by the tests below): name -> RunResult."""
    out = {}
    for name in METHODS.names():
        run_dir = tmp_path_factory.mktemp(name) / "run"
        out[name] = run(_cfg(tiny_overrides, f"method={name}", *fast_method_options(name)), run_dir=run_dir)
    return out


# --- every method -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_runs_the_loop_and_writes_the_metrics_schema(name: str, runs) -> None:
    res = runs[name]
    m = json.loads((res.run_dir / "metrics.json").read_text())
    for key in SCHEMA:
        assert key in m, key
    assert m["method"] == name and m["complete"] is True
    assert len(m["rounds"]) == 4 and len(m["tasks"]) == 2
    assert [len(row) for row in m["accuracy_matrix"]] == [2, 2]
    assert m["accuracy_matrix"][0][1] is None and all(v is not None for v in m["accuracy_matrix"][1])
    assert 0.0 <= m["final_average_accuracy"] <= 1.0 and m["forgetting"] is not None
    assert m["trainable_parameters"] > 0
    assert all(r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0 for r in m["rounds"])
    assert np.isfinite([r["train_loss"] for r in m["rounds"]]).all()
    # The final model reloads into the same predictions (every method's trained tensors are stored).
    reloaded = load_final(res.run_dir)
    saved = res.model.parameters_by_key()
    for k, p in reloaded.parameters_by_key().items():
        assert torch.equal(p, saved[k].detach().cpu()), k


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_runs_on_a_text_backbone(name: str, tiny_bert, tmp_path, write_banking, text_overrides,
                                              fast_method_options) -> None:
    data = write_banking(tmp_path / "b77")
    cfg = resolve("tiny-vit", [*text_overrides(tiny_bert, data), f"method={name}", *fast_method_options(name)])
    res = run(cfg, run_dir=tmp_path / "run")
    m = res.metrics
    assert m["complete"] and len(m["rounds"]) == 4 and [len(r) for r in m["accuracy_matrix"]] == [2, 2]
    assert 0.0 <= m["final_average_accuracy"] <= 1.0
    reloaded = load_final(tmp_path / "run")
    saved = res.model.parameters_by_key()
    assert all(torch.equal(p, saved[k].detach().cpu()) for k, p in reloaded.parameters_by_key().items())


def test_every_method_documents_its_paper_and_departures() -> None:
    import importlib

    for name in METHODS.names():
        cls = METHODS.get(name)
        doc = importlib.import_module(cls.__module__).__doc__ or ""
        assert cls.summary and "Departures" in doc, name


def test_planned_methods_cannot_run() -> None:
    assert {"target", "lander", "glfc"} <= set(METHODS.names())
    assert not set(METHODS.planned()) & set(METHODS.names())
    for name in METHODS.planned():
        with pytest.raises(ConfigError, match="planned"):
            check_config(resolve("tiny-vit", [f"method={name}"]))


@pytest.mark.parametrize(("overrides", "match"), [
    (["method=fedprox", "method_options.nu=1"], "unknown config key 'method_options.nu'"),
    (["method=fedprox", "method_options.mu=-0.5"], "method_options.mu"),
    (["method=fedprox", "method_options.mu=abc"], "method_options.mu"),
    (["method=fedtalora", "method_options.mu=0.1"], "takes no options"),
    (["method=pilora", "method_options.prototypes=median"], "method_options.prototypes"),
    (["method=pilora", "method_options.temperature=0"], "method_options.temperature"),
])
def test_method_options_are_validated_strictly(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_config(resolve("tiny-vit", overrides))


def test_method_options_reach_the_method() -> None:
    cfg = resolve("tiny-vit", ["method=fedprox", "method_options.mu=0.25"])
    method = build_method(cfg)
    assert method.options.mu == 0.25
    assert METHODS.get("pilora").option_names() == ["ortho", "l1", "pl", "temperature", "prototypes"]


# --- fedlora / fedtalora ---------------------------------------------------------------------------


def test_fedlora_has_an_aggregation_error_that_the_residual_removes(runs) -> None:
    naive = runs["fedlora"].metrics
    exact = runs["fedtalora"].metrics
    assert naive["max_aggregation_error"] > 1e-3  # non-IID Dirichlet(0.5) clients disagree
    assert exact["max_aggregation_error"] < 1e-5
    assert naive["max_aggregation_error_rounding"] > 100  # far beyond float32 rounding ...
    assert exact["max_aggregation_error_rounding"] <= 2  # ... and at float32 resolution, per round
    assert exact["max_aggregation_error_accumulated_rounding"] <= 2  # and over the run (the exact base)
    assert naive["max_aggregation_error_accumulated"] is None  # fedlora keeps no exact base
    assert all(r["residual_bytes_factored"] == 0 for r in naive["rounds"])
    assert all(r["residual_bytes_factored"] > 0 for r in exact["rounds"])


def test_every_round_records_what_naive_averaging_would_lose(runs) -> None:
    """naive_aggregation_loss: the loss of averaging the factors, measured with or without the residual
    (equal to aggregation_error without it); None for methods that aggregate no LoRA factors."""
    naive, exact, head = runs["fedlora"].metrics, runs["fedtalora"].metrics, runs["head-only"].metrics
    assert all(r["naive_aggregation_loss"] == r["aggregation_error"] for r in naive["rounds"])
    assert all(r["naive_aggregation_loss"] > 1e-3 > 1e-5 > r["aggregation_error"] for r in exact["rounds"])
    # fedtalora's first round starts from the same model as fedlora's: the same clients, the same loss
    assert exact["rounds"][0]["naive_aggregation_loss"] == pytest.approx(naive["rounds"][0]["aggregation_error"])
    losses = [r["naive_aggregation_loss"] for r in exact["rounds"]]
    assert exact["naive_aggregation_loss_max"] == max(losses)
    assert exact["naive_aggregation_loss_mean"] == pytest.approx(sum(losses) / len(losses))
    assert all(r["naive_aggregation_loss"] is None for r in head["rounds"])
    assert head["naive_aggregation_loss_mean"] is None and head["naive_aggregation_loss_max"] is None


def test_fedlora_ignores_fed_residual(tiny_overrides) -> None:
    on = run(_cfg(tiny_overrides, "method=fedlora", "fed.residual=true", "fed.rounds_per_task=1"))
    off = run(_cfg(tiny_overrides, "method=fedlora", "fed.residual=false", "fed.rounds_per_task=1"))
    assert without_timing(on.metrics) == without_timing(off.metrics)


# --- ffa-lora ---------------------------------------------------------------------------------------


def test_ffa_lora_leaves_A_untouched_and_sends_only_B_and_head(runs, tiny_overrides) -> None:
    res = runs["ffa-lora"]
    fresh = _fresh_model(_cfg(tiny_overrides, "method=ffa-lora"))
    params, init = res.model.parameters_by_key(), fresh.parameters_by_key()
    for pair in res.model.lora_pairs():
        assert torch.equal(params[pair.a_key], init[pair.a_key]), pair.a_key
        assert not torch.equal(params[pair.b_key], init[pair.b_key]), pair.b_key
        assert torch.equal(res.model.base_weight(pair.layer), fresh.base_weight(pair.layer))  # no residual
    n_b = sum(params[p.b_key].numel() for p in res.model.lora_pairs())
    n_head = sum(p.numel() for p in res.model.head_parameters().values())
    assert res.metrics["trainable_parameters"] == n_b + n_head
    assert res.metrics["max_aggregation_error"] < 1e-5  # exact by construction (rounding only)
    assert res.metrics["max_aggregation_error_rounding"] <= 2


# --- fedprox ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["false", "true"])
def test_fedprox_with_mu_zero_is_exactly_fedtalora(residual: str, tiny_overrides) -> None:
    extra = [f"fed.residual={residual}", "fed.rounds_per_task=1"]
    prox = run(_cfg(tiny_overrides, "method=fedprox", "method_options.mu=0", *extra))
    base = run(_cfg(tiny_overrides, "method=fedtalora", *extra))
    a, b = without_timing(prox.metrics), without_timing(base.metrics)
    assert a.pop("method") == "fedprox" and b.pop("method") == "fedtalora"
    assert a == b
    pa, pb = prox.model.parameters_by_key(), base.model.parameters_by_key()
    assert all(torch.equal(pa[k], pb[k]) for k in pb)


def test_fedprox_pulls_the_local_model_towards_the_global_one(tiny_overrides) -> None:
    """A larger mu keeps the client's trained tensors closer to the state it received."""
    from fedtalora.fed.client import local_train
    from fedtalora.fed.transport import class_mask

    drift = {}
    for mu in (0.0, 50.0):
        setup = prepare(_cfg(tiny_overrides, "method=fedprox", f"method_options.mu={mu}", "train.local_epochs=3"))
        model, method, exp = setup.model, setup.method, setup.exp
        keys = method.trainable_keys(model)
        start = model.trainable_state(keys)
        idx = exp.partitions[0][0]
        mask = torch.zeros(exp.scenario.num_classes, dtype=torch.bool)
        mask[:5] = True
        res = local_train(model, method, start, client=0, split=exp.dataset.train, indices=idx,
                          targets=exp.train_targets[idx], class_mask=class_mask("task", mask, exp.train_targets[idx]),
                          transform=setup.transform, cfg=setup.cfg.train, generator=torch.Generator().manual_seed(0),
                          device=torch.device("cpu"))
        drift[mu] = float(proximal_term(res.state, start)) ** 0.5
    assert 0 < drift[50.0] < 0.5 * drift[0.0]


def test_proximal_term_hand_computed() -> None:
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    anchor = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    assert float(proximal_term(params, anchor)) == 1 + 4 + 4


# --- head-only --------------------------------------------------------------------------------------


def test_head_only_changes_no_backbone_or_lora_weight(runs, tiny_overrides) -> None:
    res = runs["head-only"]
    fresh = _fresh_model(_cfg(tiny_overrides, "method=head-only"))
    now, before = res.model.backbone.state_dict(), fresh.backbone.state_dict()
    assert set(now) == set(before)
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert changed == []
    assert not torch.equal(res.model.head.weight, fresh.head.weight)
    assert res.metrics["trainable_parameters"] == sum(p.numel() for p in fresh.head_parameters().values())


# --- finetune ---------------------------------------------------------------------------------------


def test_finetune_trains_the_backbone_not_the_lora(runs, tiny_overrides) -> None:
    res = runs["finetune"]
    fresh = _fresh_model(_cfg(tiny_overrides, "method=finetune"))
    now, before = dict(res.model.backbone.named_parameters()), dict(fresh.backbone.named_parameters())
    lora = [k for k in before if ".lora_" in k]
    body = [k for k in before if ".lora_" not in k]
    assert lora and all(torch.equal(now[k], before[k]) for k in lora)
    changed = [k for k in body if not torch.equal(now[k], before[k])]
    assert "patch_embed.proj.weight" in changed and "blocks.0.attn.qkv.base_layer.weight" in changed
    assert len(changed) > 0.9 * len(body)
    assert res.metrics["trainable_parameters"] == sum(before[k].numel() for k in body) + sum(
        p.numel() for p in fresh.head_parameters().values())


@pytest.mark.parametrize("seed", range(5))
def test_finetune_running_sum_equals_the_weighted_mean(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    K = int(torch.randint(1, 6, (1,), generator=g))
    shapes = {"w": (7, 3), "b": (5,), "x": (2, 2, 2)}
    updates = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(K)]
    counts = torch.randint(1, 100, (K,), generator=g).tolist()
    buf = RunningMean()
    for u, n in zip(updates, counts, strict=True):
        buf.add(u, n)
    got = buf.mean()
    p = normalize_weights(counts)
    for k in shapes:
        torch.testing.assert_close(got[k], weighted_average([u[k] for u in updates], p), rtol=1e-6, atol=1e-7)
    # One client: its state unchanged; a hand example.
    one = RunningMean()
    one.add(updates[0], 3)
    assert all(torch.equal(one.mean()[k], updates[0][k]) for k in shapes)
    two = RunningMean()
    two.add({"w": torch.tensor([0.0, 4.0])}, 1)
    two.add({"w": torch.tensor([4.0, 0.0])}, 3)
    assert torch.equal(two.mean()["w"], torch.tensor([3.0, 1.0]))


def test_finetune_buffer_keeps_no_client_copies() -> None:
    buf = RunningMean()
    for k in range(4):
        buf.add({"w": torch.full((3,), float(k))}, 1)
    assert buf.states == [] and len(buf) == 4 and set(buf.sums) == {"w"}
    with pytest.raises(Exception, match="different keys"):
        buf.add({"v": torch.zeros(3)}, 1)


# --- pilora -----------------------------------------------------------------------------------------


def _pilora_trace(cfg: Any) -> tuple[Any, dict[str, Any]]:
    """Run pilora, recording the global model at the end of task 0 and the base weights after every round."""
    setup = prepare(cfg)
    model, method, exp = setup.model, setup.method, setup.exp
    pairs = model.lora_pairs()
    trace: dict[str, Any] = {"base_rounds": {}, "initial_base": {p.layer: model.base_weight(p.layer).clone()
                                                                for p in pairs}}

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "round":
            trace["base_rounds"][(event["task"], event["round"])] = {
                p.layer: model.base_weight(p.layer).clone() for p in pairs}
        if event["event"] == "task" and event["task"] == 0:
            params = model.parameters_by_key()
            trace["end0"] = {k: v.detach().clone() for k, v in params.items()}
            trace["end0_base"] = {p.layer: model.base_weight(p.layer).clone() for p in pairs}
            feats = {}
            for k in range(cfg.fed.num_clients):
                idx = exp.partitions[0][k]
                with torch.no_grad():
                    model.eval()
                    x = setup.transform(exp.dataset.train.inputs[torch.as_tensor(idx)], train=False)
                    feats[k] = (model.features(x).float(), torch.as_tensor(exp.train_targets[idx]))
            trace["end0_features"] = feats

    result = run(setup, progress=progress)
    trace["method"] = method
    return result, trace


def test_the_exact_base_is_kept_by_the_methods_that_change_the_base(tiny_overrides, runs) -> None:
    """build_components enables it from the method's capability flags (folds_residual with fed.residual,
    merges_into_base), never from its name; what it holds is the run's base."""
    from fedtalora.fed.build import build_components

    def kept(*extra: str) -> bool:
        return build_components(_cfg(tiny_overrides, *extra), 10).model.exact_base is not None

    assert {name for name in METHODS.names() if kept(f"method={name}")} == {
        "fedtalora", "fedprox", "pilora", "glfc", "target", "lander"}
    assert not kept("fed.residual=false") and kept("method=pilora", "fed.residual=false")

    class Folding(METHODS.get("fedlora")):  # the same method, declaring that it folds the residual
        folds_residual = True

    assert Folding(None, build_method(_cfg(tiny_overrides)).ctx).changes_base
    for name in ("fedtalora", "pilora"):
        model, m = runs[name].model, runs[name].metrics
        acc = model.exact_base
        for p in model.lora_pairs():
            assert acc.acc[p.layer].dtype == torch.float64 and acc.acc[p.layer].abs().sum() > 0, (name, p.layer)
            assert torch.equal(model.base_weight(p.layer), (acc.w0[p.layer].double() + acc.acc[p.layer]).float())
        assert m["max_aggregation_error_accumulated_rounding"] <= 2, name


def test_pilora_keeps_earlier_tasks_lora_frozen_in_the_base(tiny_overrides) -> None:
    cfg = _cfg(tiny_overrides, "method=pilora")
    res, trace = _pilora_trace(cfg)
    model = res.model
    pairs = model.lora_pairs()
    end0 = trace["end0"]
    # Task 0: naive averaging, so the base is the pre-trained one in every round.
    for r in range(2):
        for p in pairs:
            assert torch.equal(trace["base_rounds"][(0, r)][p.layer], trace["initial_base"][p.layer])
    # Task 1: the base holds task 0's global LoRA merged in (W0 + s B0 A0), and no round of task 1 changes it.
    for p in pairs:
        merged = trace["end0_base"][p.layer] + p.scaling * end0[p.b_key] @ end0[p.a_key]
        torch.testing.assert_close(trace["base_rounds"][(1, 0)][p.layer], merged, rtol=0, atol=1e-6)
        # ... merged exactly: W0 + s B0 A0 in float64 (the exact base), rounded once to float32
        exact = trace["initial_base"][p.layer].double() + p.scaling * (end0[p.b_key].double() @ end0[p.a_key].double())
        assert torch.equal(trace["base_rounds"][(1, 0)][p.layer], exact.float())
        assert torch.equal(trace["base_rounds"][(1, 1)][p.layer], trace["base_rounds"][(1, 0)][p.layer])
        assert torch.equal(model.base_weight(p.layer), trace["base_rounds"][(1, 0)][p.layer])
    # Task 0's A is kept for the orthogonality loss; task 1 trained a fresh LoRA.
    prev = trace["method"].previous_A
    assert len(prev) == 1
    params = model.parameters_by_key()
    for p in pairs:
        assert torch.equal(prev[0][p.layer], end0[p.a_key])
        assert not torch.equal(params[p.a_key], end0[p.a_key])
    # Task 0's prototypes are untouched by task 1 (old rows get no gradient under the task mask).
    rows0 = list(range(5))
    assert torch.equal(model.head.weight[rows0], end0["head.weight"][rows0])


def test_pilora_prototypes_are_the_weighted_class_means_of_client_features(tiny_overrides) -> None:
    cfg = _cfg(tiny_overrides, "method=pilora")
    res, trace = _pilora_trace(cfg)
    feats = trace["end0_features"]  # all 3 clients take part in every round
    d = next(iter(feats.values()))[0].shape[1]
    sums, counts = torch.zeros(5, d, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for f, y in feats.values():
        for c in range(5):
            sel = y == c
            sums[c] += f[sel].double().sum(0)
            counts[c] += sel.sum()
    assert (counts > 0).all()
    expected = (sums / counts[:, None]).float()
    torch.testing.assert_close(trace["end0"]["head.weight"][:5], expected, rtol=1e-5, atol=1e-5)
    # The prototype upload is counted in the last round of each task.
    rounds = res.metrics["rounds"]
    assert rounds[1]["uplink_bytes"] > rounds[0]["uplink_bytes"]


def test_pilora_predicts_the_nearest_prototype(tiny_overrides) -> None:
    cfg = _cfg(tiny_overrides, "method=pilora")
    method = build_method(cfg)
    model = build_model(cfg.model, cfg.lora, 4, cfg.data.image_size, cfg.seed)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        feats = model.features(x)
        model.head.weight.copy_(feats[[3, 0, 5, 1]])  # prototype j = the features of sample order[j]
        logits = method.forward(model, x)
    assert logits[[3, 0, 5, 1]].argmax(1).tolist() == [0, 1, 2, 3]


def test_pilora_resume_matches_an_uninterrupted_run(tiny_overrides, crash_then_resume, tmp_path) -> None:
    cfg = _cfg(tiny_overrides, "method=pilora")
    ref = run(cfg, run_dir=tmp_path / "ref").metrics

    for crash in (1, 2):  # the last round of task 0 (before its prototypes are kept), the first of task 1
        got = crash_then_resume(cfg, tmp_path / f"crash{crash}", crash)
        assert without_timing(got) == without_timing(ref), crash


def test_pilora_checkpoint_state_round_trip(tiny_overrides) -> None:
    cfg = _cfg(tiny_overrides, "method=pilora")
    a, b = build_method(cfg), build_method(cfg)
    a.previous_A = [{"x": torch.randn(2, 3)}, {"x": torch.randn(2, 3)}]
    b.load_checkpoint_state(a.checkpoint_state())
    assert len(b.previous_A) == 2 and all(torch.equal(b.previous_A[t]["x"], a.previous_A[t]["x"]) for t in range(2))
    from fedtalora.errors import CheckpointError

    with pytest.raises(CheckpointError):
        b.load_checkpoint_state({"previous_A/1/x": torch.zeros(1)})
    with pytest.raises(CheckpointError):
        b.load_checkpoint_state({"other": torch.zeros(1)})


def test_class_sums_and_pooled_prototypes_hand_computed() -> None:
    f = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [9.0, 9.0]])
    y = torch.tensor([10, 10, 11, 7])  # 7 is outside the task (classes 10, 11, 12)
    sums, counts = class_sums(f, y, range(10, 13))
    assert sums.tolist() == [[4.0, 2.0], [5.0, 5.0], [0.0, 0.0]] and counts.tolist() == [2, 1, 0]
    # Two clients: class 0 held by both (2 and 1 samples), class 1 by one, class 2 by none.
    S = torch.stack([sums, torch.tensor([[8.0, 8.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)])
    C = torch.stack([counts, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)])
    protos, present = pooled_prototypes(S, C)
    assert present.tolist() == [True, True, False]
    assert protos.tolist() == [[4.0, 10 / 3], [5.0, 5.0], [0.0, 0.0]]


def test_pilora_client_weights() -> None:
    assert pilora_client_weights(torch.randn(1, 4)).tolist() == [1.0]
    same = torch.ones(3, 4)
    assert torch.allclose(pilora_client_weights(same), torch.full((3,), 1 / 3, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    means = torch.cat([torch.randn(4, 8, generator=g) * 0.1, torch.full((1, 8), 10.0)])  # one outlier
    w = pilora_client_weights(means)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert int(w.argmin()) == 4
    # Symmetric clients: the re-weighted prototype is their midpoint.
    S = torch.tensor([[[0.0, 0.0]], [[4.0, 2.0]]], dtype=torch.float64)
    C = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    protos, _ = reweighted_prototypes(S, C)
    assert protos.tolist() == [[1.0, 0.5]]


def test_prototype_distance_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(1)
    f, c = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)
    expected = ((f[:, None, :] - c[None, :, :]) ** 2).sum(-1).div(6).sqrt()
    torch.testing.assert_close(prototype_distance(f, c), expected, rtol=1e-5, atol=1e-5)


# --- prompt -----------------------------------------------------------------------------------------


def test_prompt_trains_prompts_keys_and_head_only(runs, tiny_overrides) -> None:
    res = runs["prompt"]
    fresh = _fresh_model(_cfg(tiny_overrides, "method=prompt"))
    now, before = res.model.backbone.state_dict(), fresh.backbone.state_dict()
    assert [k for k in before if not torch.equal(now[k], before[k])] == []
    assert torch.equal(fresh.prompt.prompts, _fresh_model(_cfg(tiny_overrides, "method=prompt")).prompt.prompts)
    for name in ("prompts", "keys"):
        assert not torch.equal(getattr(res.model.prompt, name), getattr(fresh.prompt, name)), name
    o = METHODS.get("prompt").Options()
    D = fresh.spec.num_features
    head = sum(p.numel() for p in fresh.head_parameters().values())
    assert res.metrics["trainable_parameters"] == o.pool_size * (o.length + 1) * D + head


def test_prompt_selects_the_best_matching_keys() -> None:
    keys = torch.eye(4, 3)[:, :3].clone()  # key j = e_j (key 3 = 0 vector, never best)
    keys[3] = torch.tensor([-1.0, -1.0, -1.0])
    prompts = torch.arange(4, dtype=torch.float32)[:, None, None].expand(4, 2, 3).clone()  # prompt j filled with j
    pool = PromptPool(prompts, keys)
    query = torch.tensor([[0.0, 5.0, 0.0], [1.0, 0.0, 0.1]])
    tokens, match = select_and_match(pool, query, 2)
    assert tokens.shape == (2, 4, 3)
    assert tokens[0, :, 0].tolist() == [1, 1, 0, 0] or tokens[0, :, 0].tolist() == [1, 1, 2, 2]
    assert tokens[1, :2, 0].tolist() == [0, 0] and tokens[1, 2:, 0].tolist() == [2, 2]
    exact, m0 = select_and_match(pool, torch.tensor([[0.0, 0.0, 2.0]]), 1)
    assert exact[0, :, 0].tolist() == [2, 2] and float(m0.detach()) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(match.detach()) < 1


@pytest.mark.parametrize(("overrides", "match"), [
    (["method=prompt", "method_options.top_k=11"], "method_options.top_k"),
    (["method=prompt", "method_options.length=0"], "method_options.length"),
])
def test_prompt_options(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_config(resolve("tiny-vit", overrides))


# --- hooks ------------------------------------------------------------------------------------------


def test_base_method_defaults_are_fedtalora(tiny_overrides) -> None:
    cfg = _cfg(tiny_overrides)
    assert isinstance(build_method(cfg), Method)
    assert METHODS.get("fedtalora").Options is None


def test_methods_cli_lists_options(run_cli, tmp_path: Path) -> None:
    rc, out, err = run_cli(["methods"], cwd=tmp_path)
    assert rc == 0, err
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "mu" in lines["fedprox"] and "(planned)" not in lines["pilora"]
    assert "(planned)" not in lines["glfc"] and "memory_per_class" in lines["glfc"]
