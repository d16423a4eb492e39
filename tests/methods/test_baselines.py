"""GLFC, TARGET and LANDER: end to end on images and text, resume, and the property that makes each itself.

Runs use the tiny 2-task x 2-round configuration of ``conftest.py`` (and its tiny BERT for text) with small
server budgets (:data:`FAST`), so that every test takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedtalora.api import run
from fedtalora.app.cli import main as cli_main
from fedtalora.config import resolve
from fedtalora.core.distill import (
    balanced_labels,
)
from fedtalora.errors import ConfigError
from fedtalora.fed.build import build_method, check_config, prepare
from fedtalora.fed.history import without_timing
from fedtalora.fed.rundir import load_final
from fedtalora.fed.transport import InProcessTransport, class_mask, client_round, task_mask
from fedtalora.methods import METHODS
from fedtalora.methods.distill import Snapshot
from fedtalora.methods.embedspace import complete_tokens, features_from_embeddings
from fedtalora.methods.glfc import (
    ImageEncoder,
    TokenEncoder,
    dlg_init,
    encoding_gradient,
    gradient_label,
    reconstruct,
)
from fedtalora.methods.synthesis import FeaturePrior, client_moments

VARIANTS = {
    "target": ["method=target"],
    "lander": ["method=lander"],
    "glfc": ["method=glfc"],
    "glfc-memory": ["method=glfc", "method_options.memory_per_class=3"],
}


def _variant(variant: str, fast_method_options: Any) -> list[str]:
    return [*VARIANTS[variant], *fast_method_options(VARIANTS[variant][0].split("=")[1])]


@pytest.fixture(scope="session")
def cfg_of(tiny_overrides, fast_method_options) -> Any:
    """``cfg_of(variant, *overrides)``: the tiny image configuration of a variant, small server budgets."""
    return lambda variant, *extra: resolve("tiny-vit", [*tiny_overrides, *_variant(variant, fast_method_options), *extra])


@pytest.fixture(scope="module")
def image_runs(cfg_of, tmp_path_factory) -> dict[str, Any]:
    out = {}
    for variant in VARIANTS:
        run_dir = tmp_path_factory.mktemp(variant) / "run"
        out[variant] = run(cfg_of(variant), run_dir=run_dir)
    return out


# --- end to end -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_runs_end_to_end_on_images_with_costs_in_the_records(variant: str, image_runs) -> None:
    res = image_runs[variant]
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert m["complete"] and len(m["rounds"]) == 4 and [len(r) for r in m["accuracy_matrix"]] == [2, 2]
    assert 0.0 <= m["final_average_accuracy"] <= 1.0
    rounds = m["rounds"]
    assert all(np.isfinite(r["train_loss"]) for r in rounds)
    assert all(r["method_downlink_bytes"] >= 0 for r in rounds)
    if variant in ("target", "lander"):
        assert rounds[1]["method_server_seconds"] > 0  # the generator trained after task 0 ...
        assert rounds[3]["method_server_seconds"] == 0  # ... not after the last task
        assert all(r["synthetic_samples"] == 0 for r in rounds[:2])
        for r in rounds[2:]:  # syn_batch samples per local step (one epoch of batches of 64)
            per_client = {str(k): 16 * math.ceil(n / 64) for k, n in zip(r["aggregated"], r["num_samples"], strict=True)}
            assert r["synthetic_samples_per_client"] == per_client
            assert r["synthetic_samples"] == sum(per_client.values())
        # every client took part in task 1's first round: only the generator travels then (the start model
        # is the teacher), once per client; in the second round the teacher, once per client
        gen_bytes = rounds[2]["method_downlink_bytes"]
        assert gen_bytes > 0 and gen_bytes % 3 == 0
        teacher = res.model  # the teacher's tensors: trainable state + adapted layers' base weights, dense
        keys = (res.model.lora_parameters() | res.model.head_parameters()).values()
        teacher_bytes = sum(p.numel() * p.element_size() for p in keys) + sum(
            teacher.base_weight(p.layer).numel() * 4 for p in teacher.lora_pairs())
        if variant == "lander":
            teacher_bytes += sum(p.numel() * 4 for p in res.model.lander_proj.parameters())
        assert rounds[3]["method_downlink_bytes"] == 3 * teacher_bytes
        assert rounds[1]["uplink_bytes"] > rounds[0]["uplink_bytes"]  # the prior's moments
    else:
        assert rounds[0]["method_server_seconds"] > 0 and rounds[0]["proxy_accuracy"] is not None
        assert rounds[0]["uplink_bytes"] > rounds[1]["uplink_bytes"]  # the prototype gradients
        expect_memory = variant == "glfc-memory"
        assert (rounds[3]["memory_samples"] is not None and rounds[3]["memory_samples"] > 0) == expect_memory
    reloaded = load_final(res.run_dir)
    saved = res.model.parameters_by_key()
    assert all(torch.equal(p, saved[k].detach().cpu()) for k, p in reloaded.parameters_by_key().items())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_runs_end_to_end_on_text(variant: str, tiny_bert, write_banking, text_overrides, fast_method_options,
                                 tmp_path) -> None:
    data = write_banking(tmp_path / "b77")
    syn = ["method_options.syn_batch=4"] if variant in ("target", "lander") else []
    cfg = resolve("tiny-vit", [*text_overrides(tiny_bert, data), *_variant(variant, fast_method_options), *syn])
    res = run(cfg, run_dir=tmp_path / "run")
    m = res.metrics
    assert m["complete"] and len(m["rounds"]) == 4 and 0.0 <= m["final_average_accuracy"] <= 1.0
    assert all(np.isfinite(r["train_loss"]) for r in m["rounds"])
    if variant in ("target", "lander"):
        assert m["rounds"][2]["synthetic_samples"] > 0
    reloaded = load_final(tmp_path / "run")
    saved = res.model.parameters_by_key()
    assert all(torch.equal(p, saved[k].detach().cpu()) for k, p in reloaded.parameters_by_key().items())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_after_a_crash_matches_an_uninterrupted_run(variant: str, cfg_of, crash_then_resume, tmp_path) -> None:
    extra = ["fed.num_clients=4", "fed.clients_per_round=3"]  # not every client in every round
    cfg = cfg_of(variant, *extra)
    ref = run(cfg, run_dir=tmp_path / "ref").metrics

    for crash in (1, 2):  # the task's last round (the server's task-end work is lost), the next task's first
        got = crash_then_resume(cfg, tmp_path / f"crash{crash}", crash)
        assert without_timing(got) == without_timing(ref), crash


@pytest.mark.parametrize("variant", ["target", "lander", "glfc-memory"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(variant: str, tiny_overrides, fast_method_options,
                                                          cli_env, tmp_path) -> None:
    """A real process killed with SIGKILL once the task-0 checkpoints exist (the generator, the old model,
    the exemplar memory are in it), then ``fedtalora resume``: the metrics equal an uninterrupted run's."""
    overrides = [*tiny_overrides, *_variant(variant, fast_method_options), "fed.num_clients=4",
                 "fed.clients_per_round=3"]
    ref = run(resolve("tiny-vit", overrides), run_dir=tmp_path / "ref").metrics
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedtalora", "run", "tiny-vit", "--quiet", *overrides,
                             f"output.dir={tmp_path}", "output.name=killed"],
                            env=cli_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a guard against a hung child, not a timing assertion
        while not (run_dir / "checkpoints" / "round-000002.json").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint of round 2 appeared"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert cli_main(["resume", str(run_dir), "--quiet"]) == 0
    got = json.loads((run_dir / "metrics.json").read_text())
    assert without_timing(got) == without_timing(ref)


# --- the distillation pulls towards the old model -------------------------------------------------------


def _task1_setup(cfg: Any, perturb: bool = True) -> tuple[Any, Any]:
    """A method at the start of task 1 whose old model is the (untrained) task-0 global model, with the
    old classes' head rows of the current model perturbed away from it."""
    setup = prepare(cfg)
    model, method, exp = setup.model, setup.method, setup.exp
    transport = InProcessTransport()
    transport.open(setup, resumed=False)
    task0, task1 = exp.scenario.tasks
    method.on_task_start(model, task0)
    method.on_round_end(model, task0, 0, transport.task_data(0, [0, 1, 2]))
    method.on_task_end(model, task0, transport.task_data(0, [0, 1, 2]))
    method.on_task_start(model, task1)
    if perturb:
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            model.head.weight[:5] += torch.randn(model.head.weight[:5].shape, generator=g) * 2.0
    return setup, transport


def _local_round(setup: Any, client: int = 0) -> Any:
    model, method, exp = setup.model, setup.method, setup.exp
    task1 = exp.scenario.tasks[1]
    idx = exp.partitions[1][client]
    keys = method.trainable_keys(model)
    return client_round(model, method, model.trainable_state(keys), cfg=setup.cfg, task=task1, round_=0,
                        client=client, num_classes=exp.scenario.num_classes, split=exp.dataset.train, indices=idx,
                        targets=exp.train_targets[idx], transform=setup.transform, device=setup.device)


def _divergence_on_synthetic(setup: Any, state: dict[str, torch.Tensor]) -> float:
    """Mean KL(old model || trained model) over the old classes on a fixed batch of synthetic samples."""
    model, method = setup.model, setup.method
    model.load_trainable(state)
    gen = method.generator
    labels = balanced_labels(5, 100, torch.Generator().manual_seed(123))
    with torch.no_grad():
        tokens = complete_tokens(model, gen.sample(labels, torch.Generator().manual_seed(5)))
        t = method.teacher.call(model, lambda m, tok: m.head(features_from_embeddings(m, tok)), tokens)[:, :5]
        model.eval()
        s = model.head(features_from_embeddings(model, tokens))[:, :5]
    return float(F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean"))


def _divergence_on_real(setup: Any, state: dict[str, torch.Tensor], client: int = 0) -> float:
    """Mean KL(old model || trained model) over the old classes on the client's task-1 data."""
    model, method, exp = setup.model, setup.method, setup.exp
    model.load_trainable(state)
    idx = exp.partitions[1][client]
    x = setup.transform(exp.dataset.train.inputs[torch.as_tensor(idx)], train=False)
    with torch.no_grad():
        t = method.teacher.logits(model, x)[:, :5]
        model.eval()
        s = model(x)[:, :5]
    return float(F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean"))


@pytest.mark.parametrize(("variant", "off"), [("target", "method_options.kd=0"), ("lander", "method_options.pre=0"),
                                              ("glfc", "method_options.rd=0")])
def test_the_distillation_term_moves_the_model_towards_the_old_models_outputs(variant: str, off: str,
                                                                              cfg_of) -> None:
    extra = ["train.local_epochs=3"]
    divergence = {}
    for name, opts in (("on", []), ("off", [off])):
        setup, _ = _task1_setup(cfg_of(variant, *extra, *opts))
        start = setup.model.trainable_state(setup.method.trainable_keys(setup.model))
        measure = _divergence_on_real if variant == "glfc" else _divergence_on_synthetic
        before = measure(setup, start)
        divergence[name] = measure(setup, _local_round(setup).state)
    assert before > 0.05  # the perturbation made the model disagree with the old one
    assert divergence["on"] < 0.8 * divergence["off"], divergence
    assert divergence["on"] < before


# --- the generator --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["target", "lander"])
def test_generated_samples_are_classified_as_intended_by_the_model_they_invert(variant: str, cfg_of) -> None:
    """After task 0 the generator inverted task 0's global model: that model puts most generated samples in
    the class they were generated for (chance: 1 / 5)."""
    setup = prepare(cfg_of(variant, "method_options.gen_steps=60"))
    model, method = setup.model, setup.method
    accuracy = {}

    class Stop(Exception):
        pass

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "task" and event["task"] == 0:  # the model is the one the generator inverted
            labels = balanced_labels(5, 200, torch.Generator().manual_seed(99))
            model.eval()
            with torch.no_grad():
                tokens = complete_tokens(model, method.generator.sample(labels, torch.Generator().manual_seed(3)))
                logits = model.head(features_from_embeddings(model, tokens))[:, :5]
            accuracy["generated"] = float((logits.argmax(1) == labels).float().mean())
            raise Stop

    with pytest.raises(Stop):
        run(setup, progress=progress)
    assert accuracy["generated"] > 0.2 + 0.3, accuracy


def test_feature_prior_pools_client_moments_exactly(cfg_of) -> None:
    setup = prepare(cfg_of("target"))
    transport = InProcessTransport()
    transport.open(setup, resumed=False)
    data = transport.task_data(0, [0, 1, 2])
    prior = FeaturePrior()
    for k in data.clients:
        prior.add(client_moments(setup.model, data.batches(k)))
    # the same statistics from all clients' data at once
    model, exp = setup.model, setup.exp
    idx = np.concatenate([exp.partitions[0][k] for k in range(3)])
    x = setup.transform(exp.dataset.train.inputs[torch.as_tensor(idx)], train=False)
    model.eval()
    with torch.no_grad():
        emb = model.backbone.patch_embed(x).reshape(-1, model.spec.num_features).double()
    mean, var = prior.mean_var("embed")
    torch.testing.assert_close(mean, emb.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, emb.var(0, unbiased=False).float(), rtol=1e-4, atol=1e-6)
    assert prior.points() == ["block0", "block1", "embed"]
    # the prior is zero exactly on data with the real statistics: on one client's own data it is not
    assert float(prior.loss({"embed": emb.float().reshape(len(idx), -1, model.spec.num_features)})) < 1e-4


def test_snapshot_gives_the_old_models_outputs_without_touching_the_model(cfg_of) -> None:
    setup = prepare(cfg_of("target"))
    model, method = setup.model, setup.method
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
    snap = Snapshot.take(model, method.trainable_keys(model))
    with torch.no_grad():
        model.head.weight.add_(1.0)
        for p in model.lora_pairs():
            model.base_weight(p.layer).add_(0.1)
        after = model(x)
    torch.testing.assert_close(snap.logits(model, x), before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), after)  # the model's own tensors are back
    assert snap.nbytes() == sum(t.numel() * 4 for t in snap.tensors.values())


# --- LANDER -----------------------------------------------------------------------------------------------


def test_lander_anchors_are_the_class_names_label_text_embeddings(cfg_of) -> None:
    from fedtalora.methods.labeltext import label_text_embeddings

    setup = prepare(cfg_of("lander"))
    method, exp = setup.method, setup.exp
    names = [exp.dataset.class_names[c] for t in exp.scenario.tasks for c in t.classes]
    le = label_text_embeddings(names, template="a photo of a {}")
    torch.testing.assert_close(method.anchors, le * math.sqrt(le.shape[1]))
    assert le.shape == (10, 384)
    torch.testing.assert_close(le.norm(dim=1), torch.ones(10))
    assert setup.model.lander_proj.out_features == 384
    assert {"lander.proj.weight", "lander.proj.bias"} <= set(method.trainable_keys(setup.model))


# --- GLFC -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image", "text"])
def test_prototype_gradient_reveals_its_label_and_inverts(kind: str) -> None:
    torch.manual_seed(0)
    enc = dlg_init(ImageEncoder(3, 7) if kind == "image" else TokenEncoder(16, 7))
    shape = (3, 8, 8) if kind == "image" else (5, 16)
    for label in range(7):
        x = torch.randn(1, *shape)
        assert gradient_label(encoding_gradient(enc, x, label)) == label
    grads = encoding_gradient(enc, x, 6)

    def distance(z: torch.Tensor) -> float:
        return float(sum(((a - b) ** 2).sum() for a, b in zip(encoding_gradient(enc, z[None], 6), grads, strict=True)))

    rec = reconstruct(enc, grads, 6, shape, iters=10, evals=5, lr=0.1, keep=2,
                      generator=torch.Generator().manual_seed(1))
    start = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))[0]
    assert rec.shape == (2, *shape) and distance(rec[-1]) < 0.5 * distance(start)


def test_glfc_keeps_an_exemplar_memory_and_trains_on_it(image_runs, cfg_of) -> None:
    res = image_runs["glfc-memory"]
    rounds = res.metrics["rounds"]
    setup = prepare(cfg_of("glfc-memory"))
    exp = setup.exp
    labels = exp.train_targets
    expected = {}
    for k in range(3):  # 3 exemplars of each task-0 class the client holds (or all it has)
        counts = np.bincount(labels[exp.partitions[0][k]], minlength=5)
        expected[str(k)] = int(np.minimum(counts, 3).sum())
    assert rounds[1]["memory_samples_per_client"] == expected  # kept at the end of task 0
    assert rounds[0]["memory_samples"] == 0 and rounds[3]["memory_samples"] > rounds[2]["memory_samples"] > 0
    assert all(r["memory_samples"] is None for r in image_runs["glfc"].metrics["rounds"])  # exemplar-free
    # in task 1 every client trains on its new data and its memory
    for r in rounds[2:]:
        assert r["num_samples"] == [len(exp.partitions[1][k]) + expected[str(k)] for k in r["aggregated"]]


def test_glfc_trains_on_every_seen_class(cfg_of) -> None:
    setup = prepare(cfg_of("glfc"))
    task1 = setup.exp.scenario.tasks[1]
    mask = setup.method.local_mask(task1, class_mask("task", task_mask(10, task1), np.array([5])))
    assert mask.tolist() == [True] * 10
    assert setup.method.local_mask(setup.exp.scenario.tasks[0], None).tolist() == [True] * 5 + [False] * 5


# --- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["target", "lander", "fedtalora", "pilora", "finetune"])
def test_exemplar_free_methods_refuse_an_exemplar_memory(method: str) -> None:
    with pytest.raises(ConfigError, match="exemplar-free") as e:
        check_config(resolve("tiny-vit", [f"method={method}", "method_options.memory_per_class=5"]))
    assert len(str(e.value).splitlines()) == 1


def test_exemplar_free_refusal_on_the_cli(run_cli, tmp_path: Path) -> None:
    rc, out, err = run_cli(["run", "tiny-vit", "method=target", "method_options.memory_per_class=5", "--quiet"],
                           cwd=tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "exemplar-free" in err


def test_registered_with_options() -> None:
    assert {"glfc", "target", "lander"} <= set(METHODS.names()) and not METHODS.planned()
    assert "memory_per_class" in METHODS.get("glfc").option_names()
    with pytest.raises(ConfigError, match="method_options.kd"):
        check_config(resolve("tiny-vit", ["method=target", "method_options.kd=-1"]))
    with pytest.raises(ConfigError, match="method_options.template"):
        check_config(resolve("tiny-vit", ["method=lander", "method_options.template=no-slot"]))


@pytest.mark.parametrize("name", ["glfc", "target", "lander"])
def test_flower_engines_take_them(name: str) -> None:
    """Their client state travels in Flower messages (tests/flower compares the numbers with in-process)."""
    pytest.importorskip("flwr")
    from fedtalora.fed.build import check_engine

    assert METHODS.get(name).needs_server_state and METHODS.get(name).runs_on_flower
    for engine in ("flower", "flower-sim"):
        check_engine(resolve("tiny-vit", [f"method={name}", f"engine={engine}"]))


def test_downlink_counts_the_generator_and_old_model_once_per_client_and_task(cfg_of) -> None:
    setup, _ = _task1_setup(cfg_of("target"), perturb=False)
    method, task1 = setup.method, setup.exp.scenario.tasks[1]
    gen, old = method.generator.nbytes(), method.teacher.nbytes()
    assert gen > 0 and old > 0
    assert method.downlink(task1, 0, 0) == gen  # round 0: the global model it receives is the old model
    assert method.downlink(task1, 0, 0) == 0  # already has both
    assert method.downlink(task1, 1, 1) == gen + old  # joins later: needs the old model too
    assert method.downlink(task1, 1, 0) == old  # had only the generator (round 0 starts from the old model)
    assert method.downlink(task1, 2, 0) == method.downlink(task1, 2, 1) == 0
    assert method.round_costs().downlink_bytes == 2 * gen + 2 * old
    task0 = setup.exp.scenario.tasks[0]
    fresh = build_method(setup.cfg)
    assert fresh.downlink(task0, 0, 0) == 0  # nothing to send before the first generator
