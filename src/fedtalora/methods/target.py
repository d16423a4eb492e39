"""``target``: TARGET -- a server-trained generator and data-free distillation of the previous global model.

Follows TARGET (Zhang, Chen, Wang, Chen, Tao, "TARGET: Federated Class-Continual Learning via
Exemplar-Free Distillation", ICCV 2023; official code ``zj-jayzhang/Federated-Class-Continual-Learning``,
``methods/target.py``), on this project's frozen pre-trained backbone with the shared LoRA and head,
aggregated as Fed-TaLoRA (``fed.residual`` applies):

* **Server, after each task but the last:** a generator is trained by inverting the global model (the
  teacher), data-free: cross-entropy of the teacher on generated samples of every class seen so far
  (weight ``oh``), a feature-statistics prior (weight ``bn``) and an adversarial term against a student
  that distils the teacher on the same samples (weight ``adv``, after ``adv_warmup`` steps)
  (:mod:`fedtalora.methods.synthesis`).
* **Clients, in every later task:** task-masked cross-entropy on their new data plus
  ``kd * H(softmax(t / T), softmax(s / T))`` on a batch of ``syn_batch`` synthetic samples of the old classes per
  local step, where ``t`` are the previous global model's logits and ``s`` the client model's, both over the
  old classes (TARGET's ``_KD_loss``, ``T = 2``, ``kd = 25``).

Departures (each forced by the pre-trained backbone or by federated accounting, none tuned on test data):

* **Prior.** TARGET matches BatchNorm running statistics (DeepInversion); ViTs and BERT encoders have none.
  The prior is the per-channel mean and variance of the embedding-space tokens and of the hidden state
  entering every transformer block, measured on the clients' task data under the task's final global
  model and pooled exactly on the server (the same statistics BN would keep, where they exist). BN running
  statistics follow the latest task; ours pool every task so far, each measured at the end of its task.
  Cost: ``2 (blocks + 1) D + blocks + 1`` float64 numbers per reporting client and task (uplink, in the last
  round's ``uplink_bytes``).
* **Where samples live.** TARGET generates 32x32 images with a convolutional generator. Here samples are
  sequences of token embeddings (ViT: patch embeddings; text: word embeddings with ``[CLS]`` / ``[SEP]``,
  ``text_tokens`` long), fed to the first block (:mod:`fedtalora.methods.embedspace`): a pixel generator for
  224x224 inputs would be far larger than the token generator (~0.4 M parameters for ViT-B/16) and text
  has no continuous input space at all.
* **What travels.** TARGET keeps a pool of synthetic images (the best batch of each synthesis round, from
  meta-learned per-batch generators with optimised ``z``) that the clients read. Here the generator itself
  is sent (once per client and task) and is class-conditional (``v = z + E[y]``) so that clients draw fresh,
  class-balanced samples of old classes from it with their own seeds; there is no per-batch meta-learning
  (FOMAML) and no pool. The previous global model (LoRA, head and the adapted layers' base weights, dense) is
  also sent once per client and task from the task's second round on; in the task's first round the global
  model a client receives *is* the previous one, so the client snapshots its start model instead
  (:meth:`Target.client_state`). Both appear in ``method_downlink_bytes`` and in ``downlink_bytes``; on Flower
  they are the method's client state, the feature moments are computed on the nodes
  (:meth:`Target.client_work`) and the synthetic-sample counts come back in the replies (:meth:`Target.client_report`).
* **Student.** TARGET's student is a freshly initialised network trained by KD (SGD lr 0.2) inside the
  synthesis loop. Here it is the shared frozen backbone with its own LoRA (A copied, B = 0) and a fresh head,
  one SGD step (``train.lr`` / ``train.head_lr``, momentum 0.9) per generator step; TARGET's CIFAR setting
  never reaches its adversarial warm-up, ours does after ``adv_warmup`` steps.
* **Budget.** ``gen_steps`` Adam steps (lr ``gen_lr``, betas 0.5/0.999) of ``gen_batch`` samples, instead of
  TARGET's synthesis rounds x ``g_steps``; the generator's output ends in per-channel scale and shift
  initialised from the clients' embedding statistics (TARGET: sigmoid + a fixed normaliser).
* Local optimiser, rounds, LoRA placement and aggregation are this project's; the partition is fixed per task.

Costs in the round records: ``method_server_seconds`` (server time to train the generator, in the task's last
round), ``synthetic_samples`` (per client and in total), ``method_downlink_bytes``.

Options (``method_options``): ``kd`` (25), ``temperature`` (2), ``syn_batch`` (0 = ``train.batch_size``),
``gen_steps`` (100), ``gen_batch`` (64), ``gen_lr`` (0.002), ``nz`` (256), ``hidden`` (256), ``oh`` (0.5),
``bn`` (10), ``adv`` (1), ``adv_warmup`` (20), ``text_tokens`` (16).
Reads from the run config: ``seed``; ``train.batch_size``, ``train.lr``, ``train.head_lr``, ``train.precision``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..core.distill import balanced_labels, soft_cross_entropy
from ..errors import CheckpointError, ConfigError
from ..seeding import seeded_torch, torch_generator
from .base import METHODS, Method, MethodContext, MethodCosts, TaskData, check_option
from .distill import ServedClients, Snapshot
from .embedspace import EmbedSpace, complete_tokens, embed_space, features_from_embeddings
from .synthesis import (
    FeaturePrior,
    GeneratorConfig,
    TokenGenerator,
    client_moments,
    moments_nbytes,
    train_generator,
)

if TYPE_CHECKING:
    from ..core.scenario import Task
    from ..model import FedModel


@dataclass
class GeneratorOptions:
    """Options of the server's data-free generator and the clients' distillation on its samples, shared by
    TARGET and LANDER (each sets its own defaults where its paper differs)."""

    temperature: float = 2.0
    """Temperature of the clients' distillation."""
    syn_batch: int = 0
    """Synthetic samples per local step (0: ``train.batch_size``)."""
    gen_steps: int = 100
    """Generator training steps on the server after each task but the last (TARGET's CIFAR-100 setting makes
    10 synthesis rounds x 10 generator steps)."""
    gen_batch: int = 64
    """Synthetic samples per generator step."""
    gen_lr: float = 0.002
    """Adam learning rate of the generator."""
    nz: int = 256
    """Size of the generator's conditioning vector."""
    hidden: int = 256
    """Width of the generator's token MLP."""
    oh: float = 0.5
    """Weight of the teacher's cross-entropy on generated samples."""
    bn: float = 10.0
    """Weight of the feature-statistics prior."""
    adv: float = 1.0
    """Weight of the adversarial (student-teacher disagreement) term; 0 disables the student."""
    adv_warmup: int = 20
    """Generator steps before the adversarial term starts."""
    text_tokens: int = 16
    """Length of a synthetic text sample, with ``[CLS]`` and ``[SEP]``."""

    def validate(self) -> None:
        for key in ("oh", "bn", "adv"):
            check_option(getattr(self, key) >= 0, key, getattr(self, key), "a number >= 0")
        for key in ("temperature", "gen_lr"):
            check_option(getattr(self, key) > 0, key, getattr(self, key), "a number > 0")
        for key in ("gen_batch", "nz", "hidden"):
            check_option(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        for key in ("syn_batch", "gen_steps", "adv_warmup"):
            check_option(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        check_option(self.text_tokens >= 3, "text_tokens", self.text_tokens, "an integer >= 3")


@dataclass
class TargetOptions(GeneratorOptions):
    kd: float = 25.0
    """Weight of the distillation term on synthetic samples (TARGET's ``--kd``)."""

    def validate(self) -> None:
        check_option(self.kd >= 0, "kd", self.kd, "a number >= 0")
        super().validate()


@METHODS.register("target")
class Target(Method):
    """Fed-TaLoRA + a server-trained generator + distillation of the previous global model on its samples."""

    name = "target"
    summary = ("TARGET (ICCV 2023): server-trained generator, data-free distillation of the previous global model "
               "(options: kd, temperature, syn_batch, gen_steps, gen_batch, gen_lr, nz, hidden, oh, bn, adv, "
               "adv_warmup, text_tokens)")
    Options = TargetOptions
    needs_server_state = True  # the generator and the old model are the server's: client_state() sends them
    condition = "embedding"
    """How the generator is conditioned on the class (see :class:`~fedtalora.methods.synthesis.TokenGenerator`)."""

    def __init__(self, options: Mapping[str, Any] | None, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        self.seed = int(ctx.seed)
        self.train_cfg = ctx.train
        self.num_classes = 0
        self.space: EmbedSpace | None = None
        self.keys: list[str] = []
        self.prior = FeaturePrior()
        self.generator: TokenGenerator | None = None
        """The latest generator (CPU), covering the classes seen before the current task."""
        self.teacher: Snapshot | None = None
        """The previous task's final global model (CPU), the clients' teacher."""
        self.served = ServedClients()
        """Clients that hold the task's generator."""
        self.served_teacher = ServedClients()
        """Clients that hold the task's teacher (a client of a task's first round has it as its start model,
        but keeps it only if it receives it)."""
        self._round = 0
        """The round the server is about to send (:meth:`downlink`): what :meth:`client_state` contains."""
        self._teacher_from_start = False
        """On a client: the teacher is the model the local round starts from (a task's first round)."""
        self._drawn = 0
        """On a client: synthetic samples drawn in the current local round (:meth:`client_report`)."""
        self._dev: dict[str, Any] = {}
        self._task: Task | None = None
        self._rng: torch.Generator | None = None
        self._client = -1
        self._costs = MethodCosts()
        self.last_generator_stats: dict[str, float] = {}
        """The generator's last training step: loss terms and the teacher's accuracy on its batch."""

    # --- model --------------------------------------------------------------------------------------

    def set_class_names(self, names: Sequence[str]) -> None:
        self.num_classes = len(names)

    def attach(self, model: FedModel) -> None:
        self.space = embed_space(model, self.options.text_tokens)
        self.keys = self.trainable_keys(model)

    # --- tasks ------------------------------------------------------------------------------------------

    def on_task_start(self, model: FedModel, task: Task) -> None:
        self._dev = {}
        self.teacher = Snapshot.take(model, self.keys) if task.index > 0 and self.generator is not None else None

    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        seen = task.label_offset + len(task.classes)
        if seen >= self.num_classes:  # the last task: nothing left to distil into
            return 0
        if data.method_work is None:
            raise ConfigError(f"method={self.name!r} needs client-side work at the end of a task that this "
                              "engine cannot run; use engine=inprocess")
        uplink = 0
        for k in data.clients:  # the reporting clients measure the prior on their task data, where they run
            totals = data.method_work(k, "moments")
            if totals:  # (empty: the client failed to answer)
                self.prior.add(totals)
                uplink += moments_nbytes(totals)
        t0 = time.perf_counter()
        self.generator = self._train_generator(model, task, seen)
        self._costs.server_seconds += time.perf_counter() - t0
        return uplink

    def client_work(self, model: FedModel, task: Task, kind: str, client: int, batches: Any) -> dict[str, torch.Tensor]:
        """``moments``: a client's per-channel moments of its task data (the generator's prior), float64."""
        if kind != "moments":
            raise ValueError(f"{self.name} has no client work {kind!r}")
        return client_moments(model, batches)

    def _new_generator(self, seen: int) -> TokenGenerator:
        o = self.options
        assert self.space is not None
        return TokenGenerator(self.space, seen, nz=o.nz, hidden=o.hidden, condition=self.condition)

    def _generator_config(self) -> GeneratorConfig:
        o = self.options
        return GeneratorConfig(steps=o.gen_steps, batch=o.gen_batch, lr=o.gen_lr, oh=o.oh, bn=o.bn, adv=o.adv,
                               adv_warmup=o.adv_warmup, student_lr=self.train_cfg.lr,
                               student_head_lr=self.train_cfg.head_lr)

    def _train_generator(self, model: FedModel, task: Task, seen: int, extra_loss: Any = None) -> TokenGenerator:
        device = model.head.weight.device
        with seeded_torch(self.seed, self.name, "generator-init", task.index):  # init draws from the global RNG
            gen = self._new_generator(seen)
        if self.prior and "embed/count" in self.prior.totals:
            mean, var = self.prior.mean_var("embed")
            gen.init_statistics(mean, var.sqrt())
        gen = gen.to(device)
        stats = train_generator(model, gen, self.prior, seen, self._generator_config(),
                                torch_generator(self.seed, self.name, "generator", task.index), extra_loss=extra_loss)
        self.last_generator_stats = stats
        return gen.cpu()

    # --- what the server sends ------------------------------------------------------------------------

    def downlink(self, task: Task, round_: int, client: int) -> int:
        """The generator once per client and task; the teacher once per client and task from the task's second
        round on (in its first round a client starts from the teacher: :meth:`client_state`)."""
        self._round = round_
        if self.teacher is None or self.generator is None:
            return 0
        nbytes = self.generator.nbytes() if self.served.first_time(task.index, client) else 0
        if round_ > 0 and self.served_teacher.first_time(task.index, client):
            nbytes += self.teacher.nbytes()
        self._costs.downlink_bytes += nbytes
        return nbytes

    def client_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What a client's distillation needs: the generator and the teacher. In a task's first round the
        global model the client receives *is* the teacher, so only the generator travels then and the client
        snapshots its start model (``{"teacher": "start"}``); from the second round on the teacher travels
        too. Nothing before the first generator (task 0)."""
        if self.teacher is None or self.generator is None:
            return {}, {}
        tensors = {"generator_classes": torch.tensor([self.generator_classes()], dtype=torch.int64),
                   **{f"generator/{k}": v.contiguous() for k, v in self.generator.state_dict().items()}}
        if self._round > 0:
            tensors.update(self.teacher.state("teacher/"))
            return tensors, {"teacher": "sent"}
        return tensors, {"teacher": "start"}

    def load_client_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        odd = [k for k in tensors if not k.startswith(("teacher/", "generator/", "generator_classes"))]
        if odd or set(meta) - {"teacher"} or meta.get("teacher", "start") not in ("start", "sent"):
            raise CheckpointError(f"{self.name} client state has unexpected content {(odd or sorted(meta))[:1]}")
        self.load_checkpoint_state(tensors)
        self._teacher_from_start = meta.get("teacher") == "start" and self.generator is not None
        if meta.get("teacher") == "sent" and self.teacher is None:
            raise CheckpointError(f"{self.name} client state names a teacher it does not carry")

    def round_costs(self) -> MethodCosts:
        costs, self._costs = self._costs, MethodCosts()
        return costs

    # --- local training ---------------------------------------------------------------------------------

    def on_client_round(self, task: Task, round_: int, client: int) -> None:
        self._task, self._client = task, client
        self._rng = torch_generator(self.seed, self.name, "synthetic", task.index, round_, client)

    def on_local_start(self, model: FedModel, global_state: dict[str, torch.Tensor]) -> None:
        device = model.head.weight.device
        if self._teacher_from_start:  # a client in a task's first round: its start model is the teacher
            self._dev = {"teacher": Snapshot.take(model, self.keys).to(device), "generator": self.generator.to(device)}
            return
        if self.teacher is not None and self.generator is not None and "teacher" not in self._dev:
            self._dev.update(teacher=self.teacher.to(device), generator=self.generator.to(device))

    def _synthetic_batch(self, model: FedModel) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(tokens, labels)`` of a batch of synthetic samples of the old classes, or None (task 0)."""
        task = self._task
        if "generator" not in self._dev or task is None or task.label_offset == 0 or self._rng is None:
            return None
        n = self.options.syn_batch or self.train_cfg.batch_size
        labels = balanced_labels(task.label_offset, n, self._rng)
        with torch.no_grad():
            tokens = complete_tokens(model, self._dev["generator"].sample(labels, self._rng))
        self._drawn += n
        return tokens, labels.to(tokens.device)

    def client_report(self) -> dict[str, Any]:
        drawn, self._drawn = self._drawn, 0
        return {"synthetic_samples": drawn} if drawn else {}

    def on_client_report(self, client: int, report: Mapping[str, Any]) -> None:
        n = int(report.get("synthetic_samples", 0))
        if n:
            counts = self._costs.synthetic_samples
            counts[client] = counts.get(client, 0) + n

    def _autocast(self, device: torch.device) -> Any:
        if self.train_cfg.precision == "bf16":  # as the clients' forward pass (fedtalora.fed.client.autocast)
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logits_of(self, model: FedModel, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher, student) logits of synthetic tokens."""
        with self._autocast(tokens.device):
            t_logits = self._dev["teacher"].call(model, lambda m, tok: m.head(features_from_embeddings(m, tok)), tokens)
            s_logits = model.head(features_from_embeddings(model, tokens))
        return t_logits.float(), s_logits.float()

    def local_loss(self, model: FedModel, x: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets)
        batch = self._synthetic_batch(model)
        if batch is None or not self.options.kd:
            return loss
        known = self._task.label_offset  # type: ignore[union-attr]
        t_logits, s_logits = self._logits_of(model, batch[0])
        return loss + self.options.kd * soft_cross_entropy(s_logits[:, :known], t_logits[:, :known],
                                                           self.options.temperature)

    # --- checkpoints ------------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = {**self.prior.state("prior/"), **self.served.state("served/"),
                 **self.served_teacher.state("served_teacher/")}
        if self.teacher is not None:
            state.update(self.teacher.state("teacher/"))
        if self.generator is not None:
            state["generator_classes"] = torch.tensor([self.generator_classes()], dtype=torch.int64)
            state.update({f"generator/{k}": v.contiguous() for k, v in self.generator.state_dict().items()})
        return state

    def generator_classes(self) -> int:
        g = self.generator
        if g is None:
            return 0
        return int(g.class_embedding.shape[0]) if g.condition == "embedding" else int(g.label_embeddings.shape[0])

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        known = ("prior/", "served/", "served_teacher/", "teacher/", "generator/", "generator_classes")
        odd = [k for k in state if not k.startswith(known)]
        if odd:
            raise CheckpointError(f"{self.name} checkpoint state has an unexpected tensor {odd[0]!r}")
        self.prior.load(state, "prior/")
        self.served.load(state, "served/")
        self.served_teacher.load(state, "served_teacher/")
        self.teacher = Snapshot.from_state(state, "teacher/")
        self.generator = None
        if "generator_classes" in state:
            gen = self._new_generator(int(state["generator_classes"][0]))
            gen.load_state_dict({k[len("generator/"):]: v for k, v in state.items() if k.startswith("generator/")})
            self.generator = gen
        self._dev = {}
