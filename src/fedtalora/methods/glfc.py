"""``glfc``: GLFC -- class-aware gradient compensation, class-semantic relation distillation, a proxy server.

Follows GLFC (Dong, Wang, Wang, Chen, Tang, Zhang, "Federated Class-Incremental Learning", CVPR 2022;
official code ``conditionWang/FCIL``: ``GLFC.py``, ``ProxyServer.py``), on this project's frozen pre-trained
backbone with the shared LoRA and head, aggregated as Fed-TaLoRA (``fed.residual`` applies):

* **Exemplar memory (opt-in).** With ``memory_per_class = m > 0`` every client keeps, at the end of each task,
  ``m`` exemplars of each class of the task it holds, chosen by herding (iCaRL) on L2-normalised features of
  the task's final global model, and trains on its new data together with its memory in every later task.
  The memory stays on the client (nothing travels); its size is in every round record
  (``memory_samples``, ``memory_samples_per_client``; null when exemplar-free). ``m = 0`` (the default) runs GLFC exemplar-free.
* **Class-aware gradient compensation (L_GC).** Local training covers all classes seen so far (the logits of
  every seen class take part, whatever ``train.logit_mask`` says). Each sample's cross-entropy is weighted by
  ``|p_y - 1|`` (the gradient of its true-class logit) divided by the mean of that quantity over the batch's
  samples of the same group -- old classes or new classes -- so both groups get the same average
  gradient size (:func:`compensation_weights`). Task 0 has no old classes: weights are 1.
* **Class-semantic relation distillation (L_RD).** From the second task on, the client's softmax over the seen
  classes is pulled (KL) towards the relation target: the old model's softmax over the old classes
  concatenated with the one-hot label over the new ones, normalised (:func:`relation_target`). The loss is
  ``gc * L_GC + rd * L_RD`` (GLFC's code: 0.5 and 0.5).
* **Proxy server choosing the old model.** In the first aggregated round of a task, every aggregated client
  takes, for each class of the task it holds, the sample nearest to its class mean (under the global
  model), perturbs it with ``proto_steps`` SGD steps on the global model's loss (GLFC's ``prototype_mask``)
  and sends the gradient of a randomly initialised, publicly seeded encoding network (LeNet-like on images;
  per-token MLP with mean pooling on text) at that input. The server infers each gradient's label from the
  sign of the last layer's gradient and reconstructs the input by gradient matching (L-BFGS, GLFC's
  iDLG-style inversion), keeping the last ``recon_images`` iterates: the monitor set. After every round the
  server evaluates the new global model on it and keeps the best one of the task (ties: the later); that
  model is the old model the clients distil from in the next task.

Departures:

* **Where text is reconstructed.** Text has no continuous input space: the prototype, its perturbation,
  the encoding network and the reconstruction live in the word-embedding space (the output of the
  frozen embedding table, ``[CLS]`` / ``[SEP]`` included), and the global model reads reconstructions through
  ``inputs_embeds`` (:mod:`fedtalora.methods.embedspace`). The prototype's token count travels with its
  gradient (the server needs the shape to invert).
* GLFC discovers new tasks from an entropy jump and lets clients join and leave between tasks; tasks here
  are announced and every client stays. The proxy's best-model record restarts every task (GLFC's keeps its
  best accuracy across tasks). Reconstruction budget: at most ``recon_per_class`` gradients per class are
  inverted (GLFC inverts every received gradient), with 20 L-BFGS steps of up to 5 evaluations, keeping
  the last 10 iterates, where GLFC runs 250 steps of up to 20 and keeps 20: one of GLFC's inversions is
  ~5000 double-backward passes (about a minute on a CPU for a tiny encoder), and the monitor set only ranks
  a task's global models, it trains nothing (raise ``recon_iters`` / ``recon_evals`` for GLFC's budget).
* The loss is softmax cross-entropy and KL as in the paper; GLFC's code uses per-class sigmoid/BCE for both
  terms. The memory has a fixed size per class (GLFC: a total of 2000 shared by the learned classes).
* What travels: the prototype gradients (uplink, in that round's ``uplink_bytes``; computed where the client runs,
  :meth:`GLFC.client_work` ``prototypes``), the old model (downlink, once per client and task, except in the
  task's first round when the old model is the previous task's final one -- the model the client starts from,
  which it snapshots; ``method_downlink_bytes``). The encoding network is seeded from the run's root seed, so
  nobody sends it. The memory never travels: it is the client's :meth:`GLFC.private_state` (on Flower, kept in
  the node's state; only its size is reported). Server time of the proxy: ``method_server_seconds``.
* Local optimiser, rounds, LoRA placement and aggregation are this project's (GLFC: SGD with a step decay,
  plain FedAvg).

Options (``method_options``): ``memory_per_class`` (0), ``gc`` (0.5), ``rd`` (0.5), ``proxy`` (true),
``proto_steps`` (50), ``proto_lr`` (0.2), ``recon_iters`` (20), ``recon_evals`` (5), ``recon_lr`` (0.1),
``recon_images`` (10), ``recon_per_class`` (1).
Reads from the run config: ``seed``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.distill import glfc_loss, herding
from ..errors import CheckpointError, ConfigError
from ..seeding import seeded_torch, torch_generator
from .base import METHODS, Method, MethodContext, MethodCosts, TaskData, check_option
from .distill import ServedClients, Snapshot
from .embedspace import embed_inputs, features_from_embeddings

if TYPE_CHECKING:
    from ..core.scenario import Task
    from ..model import FedModel


@dataclass
class GLFCOptions:
    memory_per_class: int = 0
    """Exemplars each client keeps per class of a finished task (0: exemplar-free)."""
    gc: float = 0.5
    """Weight of the gradient-compensated cross-entropy from the second task on (task 0: 1)."""
    rd: float = 0.5
    """Weight of the relation distillation."""
    proxy: bool = True
    """Choose the old model with the proxy server (false: the previous task's final global model)."""
    proto_steps: int = 50
    """SGD steps perturbing a prototype before its gradient is shared."""
    proto_lr: float = 0.2
    """Learning rate of those steps."""
    recon_iters: int = 20
    """L-BFGS steps of a reconstruction (GLFC: 250)."""
    recon_evals: int = 5
    """Function evaluations per L-BFGS step (GLFC: L-BFGS's default 20)."""
    recon_lr: float = 0.1
    """L-BFGS learning rate."""
    recon_images: int = 10
    """Last iterates of a reconstruction kept in the monitor set (GLFC: 20)."""
    recon_per_class: int = 1
    """Gradients reconstructed per class (the first ones received)."""

    def validate(self) -> None:
        check_option(self.memory_per_class >= 0, "memory_per_class", self.memory_per_class, "an integer >= 0")
        for key in ("gc", "rd", "proto_lr"):
            check_option(getattr(self, key) >= 0, key, getattr(self, key), "a number >= 0")
        check_option(self.recon_lr > 0, "recon_lr", self.recon_lr, "a number > 0")
        check_option(self.proto_steps >= 0, "proto_steps", self.proto_steps, "an integer >= 0")
        for key in ("recon_iters", "recon_evals", "recon_images", "recon_per_class"):
            check_option(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        check_option(self.recon_images <= self.recon_iters, "recon_images", self.recon_images,
                     f"an integer <= method_options.recon_iters={self.recon_iters}")


# --- the loss (pure) ---------------------------------------------------------------------------------------


# --- the proxy server's gradient encoding and inversion ---------------------------------------------------


class ImageEncoder(nn.Module):
    """GLFC's LeNet-style encoding network on images (sigmoid activations, as in gradient-inversion work)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc = nn.Linear(12 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class TokenEncoder(nn.Module):
    """The text counterpart: a per-token sigmoid layer, mean over tokens, a linear classifier."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.token = nn.Linear(dim, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.sigmoid(self.token(h)).mean(1))


def dlg_init(module: nn.Module) -> nn.Module:
    """Weights and biases uniform in [-0.5, 0.5] (the DLG initialisation GLFC gives its encoding network)."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
    return module


def encoding_gradient(encoder: nn.Module, x: torch.Tensor, label: int) -> list[torch.Tensor]:
    """The gradient of ``CE(encoder(x), label)`` w.r.t. the encoder's parameters (``x``: one sample, batched)."""
    loss = F.cross_entropy(encoder(x), torch.tensor([label], device=x.device))
    return [g.detach() for g in torch.autograd.grad(loss, list(encoder.parameters()))]


def gradient_label(grads: Sequence[torch.Tensor]) -> int:
    """The label of a single-sample gradient: the last layer's weight row with the most negative sum
    (``(p_y - 1) h`` with ``h > 0`` is the only negative row)."""
    return int(grads[-2].sum(-1).argmin())


def reconstruct(encoder: nn.Module, grads: Sequence[torch.Tensor], label: int, shape: Sequence[int], *,
                iters: int, evals: int, lr: float, keep: int, generator: torch.Generator) -> torch.Tensor:
    """Invert a gradient by matching (L-BFGS on ``sum ||grad(dummy) - grads||^2``); the last ``keep`` iterates
    ``(keep, *shape)``."""
    device = grads[0].device
    dummy = torch.randn(1, *shape, generator=generator).to(device).requires_grad_(True)
    opt = torch.optim.LBFGS([dummy], lr=lr, max_iter=evals)
    y = torch.tensor([label], device=device)
    params = list(encoder.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        dy = torch.autograd.grad(F.cross_entropy(encoder(dummy), y), params, create_graph=True)
        diff = sum(((a - b) ** 2).sum() for a, b in zip(dy, grads, strict=True))
        diff.backward()
        return diff

    kept = []
    for it in range(iters):
        opt.step(closure)
        if it >= iters - keep:
            kept.append(dummy.detach().clone())
    return torch.cat(kept)


# --- the method -------------------------------------------------------------------------------------------

_MEMORY_KEY = re.compile(r"^memory/(\d+)/(indices|labels)$")


@METHODS.register("glfc")
class GLFC(Method):
    """Fed-TaLoRA + GLFC's local loss, optional exemplar memory and proxy-selected old model."""

    name = "glfc"
    summary = ("GLFC (CVPR 2022): gradient compensation, relation distillation, proxy server; exemplar memory "
               "opt-in (options: memory_per_class, gc, rd, proxy, proto_steps, proto_lr, recon_iters, recon_evals, "
               "recon_lr, recon_images, recon_per_class)")
    Options = GLFCOptions
    needs_server_state = True  # the proxy-chosen old model is the server's: client_state() sends it

    def __init__(self, options: Mapping[str, Any] | None, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        self.seed = int(ctx.seed)
        self.num_classes = 0
        self.keys: list[str] = []
        self.memory: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        """Client -> (indices into the training split, head-output labels) of its exemplars: client-side,
        private (:meth:`private_state`; in-process every client's lives in this one object, on Flower each
        node keeps its own)."""
        self.memory_sizes: dict[int, int] = {}
        """Client -> exemplars it keeps, as the clients report them (the server's record)."""
        self.teacher: Snapshot | None = None
        self.teacher_is_final = True
        """Whether the teacher is the previous task's final global model (which round-0 clients received)."""
        self.best: Snapshot | None = None
        self.best_accuracy = -1.0
        self.best_round = -1
        self.last_round = -1
        self.monitor: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        """The proxy's monitor set of the current task: inputs, labels, text token mask (or None)."""
        self.served = ServedClients()
        """Clients that received the task's old model (in a task's first round a client starts from it when it
        is the previous task's final model: nothing is sent then)."""
        self._round = 0
        """The round the server is about to send (:meth:`downlink`): what :meth:`client_state` contains."""
        self._teacher_from_start = False
        """On a client: the old model is the model the local round starts from."""
        self._encoder: nn.Module | None = None
        self._task: Task | None = None
        self._teacher_dev: Snapshot | None = None
        self._costs = MethodCosts()

    def set_class_names(self, names: Sequence[str]) -> None:
        self.num_classes = len(names)

    def attach(self, model: FedModel) -> None:
        self.keys = self.trainable_keys(model)

    # --- tasks ------------------------------------------------------------------------------------------

    def on_task_start(self, model: FedModel, task: Task) -> None:
        self._teacher_dev = None
        if task.index > 0:
            if self.best is not None:
                self.teacher, self.teacher_is_final = self.best, self.best_round == self.last_round
            else:
                self.teacher, self.teacher_is_final = Snapshot.take(model, self.keys), True
        self.best, self.best_accuracy, self.best_round, self.last_round = None, -1.0, -1, -1
        self.monitor = None

    def on_round_end(self, model: FedModel, task: Task, round_: int, data: TaskData) -> int:
        self.last_round = round_
        if not self.options.proxy:
            return 0
        uplink = 0
        t0 = time.perf_counter()
        if self.monitor is None and data.clients:
            if data.method_work is None:
                raise ConfigError("method='glfc' needs client-side work this engine cannot run; use engine=inprocess")
            uplink = self._build_monitor(model, task, data)
        if self.monitor is not None:
            accuracy = self._monitor_accuracy(model, task)
            self._costs.proxy_accuracy = accuracy
            if accuracy >= self.best_accuracy:
                self.best, self.best_accuracy, self.best_round = Snapshot.take(model, self.keys), accuracy, round_
        self._costs.server_seconds += time.perf_counter() - t0
        return uplink

    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        m = self.options.memory_per_class
        if not m or not data.clients:
            return 0
        if data.method_work is None:
            raise ConfigError("method='glfc' with an exemplar memory needs client-side work this engine cannot run; "
                              "use engine=inprocess")
        for k in data.clients:  # each reporting client updates its own memory; only its size comes back
            size = data.method_work(k, "memory").get("memory_size")
            if size is not None:
                self.memory_sizes[k] = int(size[0])
        return 0

    def client_work(self, model: FedModel, task: Task, kind: str, client: int, batches: Any) -> dict[str, torch.Tensor]:
        """``memory``: add ``memory_per_class`` exemplars of each class of the task to the client's memory
        (herding); returns its size. ``prototypes``: the client side of the proxy server (prototype, its
        perturbation, the encoding network's gradient at it); returns the gradients."""
        if kind == "memory":
            return self._update_memory(model, client, batches)
        if kind == "prototypes":
            return self._prototype_gradients(model, task, list(batches))
        raise ValueError(f"glfc has no client work {kind!r}")

    def _update_memory(self, model: FedModel, client: int, batches: Any) -> dict[str, torch.Tensor]:
        m = self.options.memory_per_class
        model.eval()
        feats, labels, idx = [], [], []
        with torch.no_grad():
            for x, y, sel in batches:
                feats.append(model.features(x).float().cpu())
                labels.append(y.cpu())
                idx.append(torch.as_tensor(sel))
        f, y_all, i_all = torch.cat(feats), torch.cat(labels), torch.cat(idx)
        new_idx, new_lab = [], []
        for c in torch.unique(y_all).tolist():
            rows = torch.nonzero(y_all == c).squeeze(1)
            pick = rows[herding(f[rows], m)]
            new_idx.append(i_all[pick].numpy())
            new_lab.append(y_all[pick].numpy())
        old = self.memory.get(client, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        self.memory[client] = (np.concatenate([old[0], *new_idx]).astype(np.int64),
                               np.concatenate([old[1], *new_lab]).astype(np.int64))
        return {"memory_size": torch.tensor([len(self.memory[client][0])], dtype=torch.int64)}

    def private_state(self, client: int) -> dict[str, torch.Tensor]:
        if client not in self.memory:
            return {}
        idx, lab = self.memory[client]
        return {"indices": torch.as_tensor(idx, dtype=torch.int64), "labels": torch.as_tensor(lab, dtype=torch.int64)}

    def load_private_state(self, client: int, tensors: dict[str, torch.Tensor]) -> None:
        if tensors and (set(tensors) != {"indices", "labels"} or len(tensors["indices"]) != len(tensors["labels"])):
            raise CheckpointError("glfc: this node's exemplar memory is torn")
        self.memory = {client: (tensors["indices"].numpy().astype(np.int64),
                                tensors["labels"].numpy().astype(np.int64))} if tensors else {}

    # --- the proxy server -------------------------------------------------------------------------------------

    def _encoder_for(self, model: FedModel, device: torch.device) -> nn.Module:
        if self._encoder is None:
            with seeded_torch(self.seed, self.name, "encoder"):  # public: every party builds the same one
                if model.spec.modality == "text":
                    enc: nn.Module = TokenEncoder(model.spec.num_features, self.num_classes)
                else:
                    enc = ImageEncoder(3, self.num_classes)
                self._encoder = dlg_init(enc)
        return self._encoder.to(device)

    def _prototypes(self, model: FedModel, batches: list[Any]) -> list[tuple[int, Any]]:
        """A client: per class it holds, ``(label, the sample nearest its class mean)`` (one-sample batch)."""
        feats, labels = [], []
        model.eval()
        with torch.no_grad():
            for x, y, _ in batches:
                feats.append(model.features(x).float())
                labels.append(y)
        f, y_all = torch.cat(feats), torch.cat(labels)
        wanted = {}
        for c in torch.unique(y_all).tolist():
            rows = torch.nonzero(y_all == c).squeeze(1)
            dist = (f[rows] - f[rows].mean(0)).norm(dim=1)
            wanted[int(rows[int(dist.argmin())])] = int(c)
        out, offset = [], 0
        for x, y, _ in batches:
            n = len(y)
            for pos in sorted(p for p in wanted if offset <= p < offset + n):
                out.append((wanted[pos], _one_sample(x, pos - offset)))
            offset += n
        return out

    def _as_input(self, model: FedModel, sample: Any) -> torch.Tensor:
        """A one-sample batch in the space the proxy works in: images as they are, text as word embeddings."""
        if model.spec.modality != "text":
            return sample
        with torch.no_grad():
            h, _ = embed_inputs(model, sample)
        return h

    def _seen_logits(self, model: FedModel, inp: torch.Tensor, seen: int, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
        if model.spec.modality == "text":
            return model.head(features_from_embeddings(model, inp, mask))[:, :seen]
        return model(inp)[:, :seen]

    def _prototype_gradients(self, model: FedModel, task: Task, batches: list[Any]) -> dict[str, torch.Tensor]:
        """A client's part of the proxy: per class it holds, the prototype perturbed by ``proto_steps`` steps
        and the encoding network's gradient at it, as ``p<i>/g<j>`` (gradients, CPU), ``p<i>/label`` (the true
        label, for bookkeeping only: the server infers it from the gradient) and ``p<i>/shape``."""
        o = self.options
        device = model.head.weight.device
        encoder = self._encoder_for(model, device)
        seen = task.label_offset + len(task.classes)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        out: dict[str, torch.Tensor] = {}
        try:
            for i, (label, sample) in enumerate(self._prototypes(model, batches)):
                inp = self._as_input(model, sample).detach().clone().requires_grad_(True)
                opt = torch.optim.SGD([inp], lr=o.proto_lr)
                target = torch.tensor([label], device=device)
                for _ in range(o.proto_steps):
                    opt.zero_grad()
                    F.cross_entropy(self._seen_logits(model, inp, seen), target).backward()
                    opt.step()
                for j, g in enumerate(encoding_gradient(encoder, inp.detach(), label)):
                    out[f"p{i}/g{j}"] = g.cpu()
                out[f"p{i}/label"] = torch.tensor([label], dtype=torch.int64)
                out[f"p{i}/shape"] = torch.tensor(inp.shape[1:], dtype=torch.int64)
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        return out

    def _build_monitor(self, model: FedModel, task: Task, data: TaskData) -> int:
        o = self.options
        device = model.head.weight.device
        encoder = self._encoder_for(model, device)
        grads_by_class: dict[int, list[tuple[list[torch.Tensor], tuple[int, ...]]]] = {}
        uplink = 0
        for k in data.clients:  # client side: prototype, perturbation, encoding gradient (where k runs)
            sent = data.method_work(k, "prototypes")  # type: ignore[misc]
            for i in range(sum(1 for key in sent if key.endswith("/label"))):
                grads = [sent[f"p{i}/g{j}"].to(device) for j in range(len(list(encoder.parameters())))]
                uplink += sum(g.numel() * g.element_size() for g in grads) + 8  # + the input's length
                label = int(sent[f"p{i}/label"][0])
                grads_by_class.setdefault(label, []).append((grads, tuple(sent[f"p{i}/shape"].tolist())))
        xs, ys = [], []  # server side: label from the gradient, inversion
        for label in sorted(grads_by_class):
            for j, (grads, shape) in enumerate(grads_by_class[label][:o.recon_per_class]):
                inferred = gradient_label(grads)
                rec = reconstruct(encoder, grads, inferred, shape, iters=o.recon_iters, evals=o.recon_evals,
                                  lr=o.recon_lr, keep=o.recon_images,
                                  generator=torch_generator(self.seed, self.name, "dummy", task.index, label, j))
                xs.extend(rec.unbind(0))
                ys.extend([inferred] * len(rec))
        if not xs:
            return uplink
        self.monitor = _stack(xs, torch.tensor(ys, dtype=torch.long), text=model.spec.modality == "text")
        return uplink

    def _monitor_accuracy(self, model: FedModel, task: Task) -> float:
        assert self.monitor is not None
        x, y, mask = self.monitor
        seen = task.label_offset + len(task.classes)
        device = model.head.weight.device
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(y), 64):
                m = None if mask is None else mask[start:start + 64].to(device)
                logits = self._seen_logits(model, x[start:start + 64].to(device), seen, m)
                correct += int((logits.argmax(1).cpu() == y[start:start + 64]).sum())
        return correct / len(y)

    # --- what the server sends ----------------------------------------------------------------------------

    def downlink(self, task: Task, round_: int, client: int) -> int:
        """The old model, once per client and task, unless it is the model the client starts from (a task's
        first round, when the old model is the previous task's final one)."""
        self._round = round_
        if self.teacher is None or (round_ == 0 and self.teacher_is_final):
            return 0
        if not self.served.first_time(task.index, client):
            return 0
        nbytes = self.teacher.nbytes()
        self._costs.downlink_bytes += nbytes
        return nbytes

    def client_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The old model the clients distil from: ``{"teacher": "start"}`` alone when it is the model they start
        from (see :meth:`downlink`), else its tensors. The memory never travels (:meth:`private_state`)."""
        if self.teacher is None:
            return {}, {}
        if self._round == 0 and self.teacher_is_final:
            return {}, {"teacher": "start"}
        return self.teacher.state("teacher/"), {"teacher": "sent"}

    def load_client_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        odd = [k for k in tensors if not k.startswith("teacher/")]
        if odd or set(meta) - {"teacher"} or meta.get("teacher", "sent") not in ("start", "sent"):
            raise CheckpointError(f"glfc client state has unexpected content {(odd or sorted(meta))[:1]}")
        self.teacher = Snapshot.from_state(tensors, "teacher/")
        self._teacher_from_start = meta.get("teacher") == "start"
        if meta.get("teacher") == "sent" and self.teacher is None:
            raise CheckpointError("glfc client state names an old model it does not carry")
        self._teacher_dev = None

    def round_costs(self) -> MethodCosts:
        costs, self._costs = self._costs, MethodCosts()
        if self.options.memory_per_class:
            costs.memory_samples = dict(sorted(self.memory_sizes.items()))
        return costs

    # --- local training -------------------------------------------------------------------------------------

    def on_client_round(self, task: Task, round_: int, client: int) -> None:
        self._task = task

    def replay(self, task: Task, client: int) -> tuple[np.ndarray, np.ndarray] | None:
        return self.memory.get(client)

    def local_mask(self, task: Task, mask: torch.Tensor | None) -> torch.Tensor | None:
        seen = torch.zeros(self.num_classes, dtype=torch.bool)
        seen[:task.label_offset + len(task.classes)] = True
        return seen

    def on_local_start(self, model: FedModel, global_state: dict[str, torch.Tensor]) -> None:
        if self._teacher_from_start:  # a client in a task's first round: its start model is the old model
            self._teacher_dev = Snapshot.take(model, self.keys).to(model.head.weight.device)
            return
        if self.teacher is not None and self._teacher_dev is None:
            self._teacher_dev = self.teacher.to(model.head.weight.device)

    def local_loss(self, model: FedModel, x: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        task = self._task
        assert task is not None
        known, seen = task.label_offset, task.label_offset + len(task.classes)
        old = None
        if known and self._teacher_dev is not None and self.options.rd:
            old = self._teacher_dev.logits(model, x)[:, :known]
        return glfc_loss(logits[:, :seen], targets, known, old, gc=self.options.gc, rd=self.options.rd)

    # --- checkpoints ----------------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {**self.served.state("served/")}
        for k, (idx, lab) in self.memory.items():
            state[f"memory/{k}/indices"] = torch.as_tensor(idx, dtype=torch.int64)
            state[f"memory/{k}/labels"] = torch.as_tensor(lab, dtype=torch.int64)
        for k, n in self.memory_sizes.items():
            state[f"memory_size/{k}"] = torch.tensor([n], dtype=torch.int64)
        if self.teacher is not None:
            state.update(self.teacher.state("teacher/"))
        if self.best is not None:
            state.update(self.best.state("best/"))
        state["proxy"] = torch.tensor([self.best_accuracy, self.best_round, self.last_round,
                                       float(self.teacher_is_final)], dtype=torch.float64)
        if self.monitor is not None:
            x, y, mask = self.monitor
            state["monitor/x"], state["monitor/y"] = x.contiguous(), y
            if mask is not None:
                state["monitor/mask"] = mask
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        known = ("served/", "memory/", "memory_size/", "teacher/", "best/", "proxy", "monitor/")
        odd = [k for k in state if not k.startswith(known)]
        if odd:
            raise CheckpointError(f"glfc checkpoint state has an unexpected tensor {odd[0]!r}")
        self.served.load(state, "served/")
        parts: dict[int, dict[str, np.ndarray]] = {}
        for key, t in state.items():
            m = _MEMORY_KEY.match(key)
            if m:
                parts.setdefault(int(m.group(1)), {})[m.group(2)] = t.numpy().astype(np.int64)
            elif key.startswith("memory/"):
                raise CheckpointError(f"glfc checkpoint state has an unexpected tensor {key!r}")
        if any(set(p) != {"indices", "labels"} or len(p["indices"]) != len(p["labels"]) for p in parts.values()):
            raise CheckpointError("glfc checkpoint state has a torn exemplar memory")
        self.memory = {k: (p["indices"], p["labels"]) for k, p in sorted(parts.items())}
        self.memory_sizes = {int(key.split("/")[1]): int(t[0]) for key, t in state.items()
                             if key.startswith("memory_size/")}
        if not self.memory_sizes:  # (a checkpoint without the sizes: the server held every memory)
            self.memory_sizes = {k: len(idx) for k, (idx, _) in self.memory.items()}
        self.teacher = Snapshot.from_state(state, "teacher/")
        self.best = Snapshot.from_state(state, "best/")
        meta = state.get("proxy", torch.tensor([-1.0, -1, -1, 1], dtype=torch.float64)).tolist()
        self.best_accuracy, self.best_round, self.last_round = meta[0], int(meta[1]), int(meta[2])
        self.teacher_is_final = bool(meta[3])
        self.monitor = None
        if "monitor/x" in state:
            self.monitor = (state["monitor/x"], state["monitor/y"].long(), state.get("monitor/mask"))
        self._teacher_dev = None


def _one_sample(x: Any, i: int) -> Any:
    """Row ``i`` of a batch as a one-sample batch (text: without its padding)."""
    if isinstance(x, Mapping):
        n = int(x["attention_mask"][i].sum())
        return {"input_ids": x["input_ids"][i:i + 1, :n], "attention_mask": x["attention_mask"][i:i + 1, :n],
                "padded": False}
    return x[i:i + 1]


def _stack(xs: list[torch.Tensor], ys: torch.Tensor, *, text: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor | None]:
    """Monitor samples as one CPU tensor; text samples of different lengths padded, with their mask."""
    if not text:
        return torch.stack(xs).cpu(), ys, None
    L = max(x.shape[0] for x in xs)
    out = torch.zeros(len(xs), L, xs[0].shape[-1])
    mask = torch.zeros(len(xs), L, dtype=torch.long)
    for i, x in enumerate(xs):
        out[i, :x.shape[0]] = x.cpu()
        mask[i, :x.shape[0]] = 1
    return out, ys, mask



