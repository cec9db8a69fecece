"""RLTrainer: one optimizer step per batch, then publish the weights.

The trainer owns the policy's trainable copy. ``train_step(inputs, targets)``
takes the replay buffer's batch (the GRPO collate's format: one dict per
data-parallel chunk), recomputes the response logprobs with gradients, applies
the loss (GRPO by default), clips the gradient and steps the optimizer.
``push_weights(policy_version)`` writes the weights, under their Hugging Face
names, to the run's weight store (``weight_store=``, the one the Policy
replicas were given), where they load them.

One process or several:

- ``RLTrainer.options(procs=1)``: one process trains on every chunk of the
  batch, concatenated. Call it with ``call_one``.
- ``RLTrainer.options(procs=N)``: N processes, one actor each, train
  data-parallel. Create the replay buffer with ``dp_size=N``; rank r trains
  on chunk r, and PyTorch's DistributedDataParallel (DDP) averages the
  gradients across ranks, so every rank takes the same step and the weights
  stay identical. Call it with ``call``: every rank returns the batch's loss.
  ``with_gpus=True`` gives each process a GPU (NCCL); on CPU the ranks talk
  over gloo.
- ``RLTrainer.options(hosts=H, procs=P)`` on a cluster (``forge_lite.attach_cluster``):
  the same over H hosts × P processes, H × P ranks; they meet at host 0.

Either way the step is the one the whole batch would give on one process: the
loss is a mean over sequences, and each rank weights its part by its share of
the whole batch.

Why DDP and not FSDP2: DDP keeps a full copy of the model on every rank and
only all-reduces gradients, which is the simplest correct scheme and enough
while the model, its gradients and the optimizer state fit on one GPU (a
1.7B model in float32 with AdamW needs about 27 GB). FSDP2 shards those over
the ranks to train models that don't fit, at the price of gathering
parameters in every forward and backward and of saving weights that are
spread over processes; switch when memory, not speed, is what limits you.

Configuration is the tutorial's three dicts:

    model={"name": "qwen3", "flavor": "1.7B", "hf_assets_path": "hf://Qwen/Qwen3-1.7B"}
    optimizer={"name": "AdamW", "lr": 1e-5}           # any torch.optim class, its kwargs
    training={"local_batch_size": 2, "seq_len": 2048}  # see optimizer.TrainingConfig

The controller's calls (``batch`` is what ``replay_buffer.sample`` returns):

    store = WeightStore()                                    # the run's, shared with the Policy
    trainer = await RLTrainer.options(procs=2).as_actor(
        model=..., optimizer=..., training=..., weight_store=store)
    inputs, targets = batch                                  # lists of 2 chunks (dp_size=2)
    losses = await trainer.train_step.call(inputs, targets)  # one loss per rank, all equal
    # or {"loss": ..., "clip_fraction": ...} per rank, with_metrics=True
    loss = next(iter(losses.values()))
    await trainer.push_weights.call(policy_version=1)        # returns once the version is stored
    await RLTrainer.shutdown(trainer)
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from forge_lite.actors.default_store import Publisher, is_default, with_default_weight_store
from forge_lite.actors.hf_model import default_device, load_causal_lm
from forge_lite.actors.optimizer import TrainingConfig, build_optimizer
from forge_lite.actors.weights import WeightStore
from forge_lite.controller import ForgeActor
from forge_lite.controller.actor import processes_of
from forge_lite.rl.collate import drop_padding_columns
from forge_lite.rl.logprobs import response_logits, token_logprobs
from forge_lite.rl.loss import grpo_loss
from monarch.actor import current_rank, current_size, endpoint


class RLTrainer(ForgeActor):
    """Trains the policy model with a loss ``loss(logprobs, ref_logprobs, advantages,
    padding_mask) -> scalar`` (GRPO by default); data-parallel with ``procs > 1``.

    A loss whose signature names them (or takes ``**kwargs``) also gets
    ``behaviour_logprobs`` (the sampler's, when the batch has them) and
    ``tokens_per_sequence`` (the whole batch's loss tokens per sequence, for
    a token mean over micro-batches); one that returns a
    ``forge_lite.rl.loss.LossOutput`` reports its clip fraction
    (``train_step(..., with_metrics=True)``). ``forge_lite.rl.loss.policy_loss``
    does all three.
    """

    def __init__(
        self,
        model: str | dict | None = None,
        optimizer: dict | None = None,
        training: dict | None = None,
        loss: Callable[..., torch.Tensor] = grpo_loss,
        weight_store: WeightStore | None = None,
    ):
        """``weight_store``: the run's weight store, a ``WeightStore`` (a folder)
        or an ``ActorWeightStore`` (versions kept in this process, for several hosts),
        where ``push_weights`` publishes (the Policy it feeds gets the same one). Without it,
        ``as_actor`` gives the trainer the kernel's default store, where the kernel's
        policies without a store load from (``forge_lite.actors.default_store``)."""
        self.weight_store = weight_store
        self.model_spec = model
        self.optimizer_config = {"name": "AdamW", "lr": 1e-5, **(optimizer or {})}
        self.training_config = training
        self.loss = loss

    @classmethod
    async def as_actor(cls, *args, **kwargs):
        """Spawn the trainer's ``procs`` processes (on each of ``hosts`` hosts)
        and connect its ranks; see ForgeActor.as_actor."""
        trainer = await super().as_actor(*args, **kwargs)
        if cls.procs * (cls.hosts or 1) == 1:
            return trainer
        # The ranks of one trainer meet at a TCP port that rank 0 listens on,
        # and every rank must know where that is before it connects. Where
        # rank 0 runs is known only once the processes are placed, so they
        # start unconnected; then the controller, the one place that talks to
        # every rank, asks rank 0 for a port free on its host and tells every
        # rank to meet there. Ranks on one host meet on its loopback address;
        # across hosts, at host 0's address (the one the cluster reached it at).
        try:
            port = await trainer.slice(**{dim: 0 for dim in trainer.extent}).free_port.call_one()
            await trainer.join.call(_meeting_host(trainer), port)
        except BaseException:
            await cls.shutdown(trainer)
            raise  # the rank's own error (e.g. a timeout connecting) arrives as itself
        return trainer

    # Configuration is checked here rather than in __init__: an error in setup
    # reaches the caller of as_actor as itself (a ValueError).
    @classmethod
    async def caller_defaults(cls, args: tuple, kwargs: dict) -> dict:
        """Without ``weight_store=``, the kernel's default store, where the
        policies of this kernel load from (``forge_lite.actors.default_store``)."""
        return await with_default_weight_store(cls.actor_class(), args, kwargs)

    @endpoint
    async def setup(self) -> None:
        self.rank = current_rank().rank
        self._publisher = Publisher()  # this trainer's claim on a default store
        self.world_size = math.prod(current_size().values())
        # Checked before the ranks meet: a rank that fails alone would leave
        # the others waiting for it.
        self.training = TrainingConfig.from_dict(self.training_config)
        if self.training.num_threads is not None:
            torch.set_num_threads(self.training.num_threads)
        device = default_device()
        if device.type == "cuda":
            # The process's one GPU (with_gpus=True), named with its index,
            # which NCCL needs to know which GPU this rank uses.
            device = torch.device("cuda", torch.cuda.current_device())
        # self.model is the Hugging Face model itself: its state_dict has the
        # HF names the weight store wants. self.trained is what runs the
        # forward: the model, or (once ``join`` connected the ranks) the DDP
        # wrapper around it that all-reduces gradients during backward.
        self.model = load_causal_lm(self.model_spec, self.training.dtype, device)
        self.model.train()
        self.trained = self.model
        self.optimizer = build_optimizer(self.model.parameters(), self.optimizer_config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.training.lr_factor)

    @endpoint
    def free_port(self) -> int:
        """A TCP port free on this rank's host (rank 0's is where the ranks meet)."""
        return free_port()

    @endpoint
    def join(self, host: str, port: int) -> None:
        """Connect this rank to the others at rank 0's ``host``:``port`` and wrap
        the model in DDP (``as_actor`` calls it on every rank at once)."""
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            # Gloo talks over the interface named by the host's name, which
            # on a machine with several (or in a network namespace) may not
            # reach the other ranks: use the one on the route to rank 0.
            interface = interface_towards(host)
            if interface is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{host}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            device_id=device if device.type == "cuda" else None,
        )
        # DDP starts every rank from rank 0's weights (in place: the
        # optimizer built in setup keeps the same parameters).
        self.trained = DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None
        )

    async def __cleanup__(self, exc: Exception | None) -> None:
        # Monarch calls this when the actor stops (RLTrainer.shutdown). The
        # process exits right after; destroying the group first closes its
        # connections cleanly (NCCL warns at exit otherwise).
        if dist.is_initialized():
            dist.destroy_process_group()

    @endpoint
    def train_step(self, inputs: list[dict], targets: list[dict], with_metrics: bool = False) -> float | dict:
        """One optimizer step on the batch; returns the whole batch's loss before the step.

        ``inputs`` and ``targets`` are what ``grpo_collate`` (or the replay
        buffer's ``sample``) returns: one dict each per data-parallel chunk,
        ``B`` sequences a chunk, request of ``Lq`` and response of ``R`` tokens:

        - ``inputs[i]``: ``"tokens"`` int64 ``[B, Lq + R]`` (request left-padded,
          then response), ``"attention_mask"`` ``[B, Lq + R]`` (optional);
        - ``targets[i]``: ``"response"`` int64 ``[B, R]``, ``"advantages"``
          float ``[B, 1]``, ``"padding_mask"`` bool ``[B, R]`` (the tokens that
          carry loss), and, when the episodes have them, ``"ref_logprobs"``
          and ``"behaviour_logprobs"`` float ``[B, R]`` (the reference
          model's, and the sampler's: the importance ratio's denominator).

        ``with_metrics=True`` returns ``{"loss": ..., "clip_fraction": ...}``
        instead: the share of the batch's ratios (tokens, or sequences under
        GSPO) whose gradient the loss's clip changed; NaN for a loss that
        reports none (SAPO, or a plain scalar loss).

        Raises ValueError when the chunks do not match each other or the
        trainer's ranks (``procs``), or a sequence is longer than
        ``training["seq_len"]``; RuntimeError when a multi-rank trainer was
        not started through ``as_actor``/``as_service`` (its ranks are not
        connected). Non-finite rewards, advantages and logprobs are refused
        before they get here, where episodes are added and collated
        (``forge_lite.rl.episode.check_finite``).
        """
        if self.world_size > 1 and not dist.is_initialized():
            raise RuntimeError(
                f"this trainer's {self.world_size} ranks are not connected: start it with "
                "RLTrainer.options(procs=..., hosts=...).as_actor(...), which connects them"
            )
        batch, target, global_batch_size = self._my_part(inputs, targets)
        batch, target = drop_padding_columns(batch, target)
        device = next(self.model.parameters()).device
        tokens = batch["tokens"].to(device)
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        # The collate puts every response at the same column.
        request_len = tokens.shape[1] - target["response"].shape[1]
        # No ref_logprobs when the run left the reference model out (beta 0).
        loss_inputs = {
            key: target[key].to(device) if key in target else None
            for key in ("ref_logprobs", "advantages", "padding_mask")
        }
        if "behaviour_logprobs" in target and accepts(self.loss, "behaviour_logprobs"):
            loss_inputs["behaviour_logprobs"] = target["behaviour_logprobs"].to(device)
        extra = {}
        if accepts(self.loss, "tokens_per_sequence"):
            # Over every chunk, so that a token mean is the whole batch's (see
            # forge_lite.rl.loss.aggregate), whatever the micro-batches and ranks.
            loss_tokens = sum(int(chunk["padding_mask"].sum()) for chunk in targets)
            extra["tokens_per_sequence"] = loss_tokens / global_batch_size

        batch_size = tokens.shape[0]
        micro = self.training.local_batch_size or batch_size
        starts = range(0, batch_size, micro)
        self.optimizer.zero_grad(set_to_none=True)
        batch_loss = 0.0
        clip_counts = torch.zeros(2, dtype=torch.float64)  # ratios clipped, ratios counted
        for start in starts:
            rows = slice(start, start + micro)
            # DDP all-reduces gradients in every backward; no_sync skips that
            # for all but the last micro-batch, whose backward reduces the sum.
            accumulate_only = self.world_size > 1 and start != starts[-1]
            with self.trained.no_sync() if accumulate_only else contextlib.nullcontext():
                mask = None if attention_mask is None else attention_mask[rows]
                # Each distinct request of the micro-batch runs once (see response_logits).
                logits = response_logits(self.trained, tokens[rows], mask, request_len)
                logprobs = token_logprobs(logits, tokens[rows, request_len:])
                loss = self.loss(logprobs, **{
                    key: None if value is None else value[rows] for key, value in loss_inputs.items()
                }, **extra)
                if isinstance(loss, tuple):  # a LossOutput: the loss and its clip counts
                    loss, clipped, counted = loss
                    clip_counts += torch.tensor([float(clipped), float(counted)], dtype=torch.float64)
                # The loss is a mean over a micro-batch's sequences; weighting it
                # by the micro-batch's share of the whole batch makes the summed
                # gradients the whole batch's mean. DDP divides the summed
                # gradients by world_size, which the weight multiplies back.
                share = logprobs.shape[0] / global_batch_size
                (loss * share * self.world_size).backward()
            batch_loss += loss.item() * share
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.training.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.world_size > 1:
            # Each rank summed its part of the batch mean; the sum over ranks
            # is the whole batch's, the same number on every rank. So are the
            # clip counts.
            total = torch.tensor([batch_loss, *clip_counts.tolist()], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            batch_loss, clip_counts = total[0].item(), total[1:].cpu()
        if not with_metrics:
            return batch_loss
        clipped, counted = clip_counts.tolist()
        return {"loss": batch_loss, "clip_fraction": clipped / counted if counted else float("nan")}

    def _my_part(self, inputs: list[dict], targets: list[dict]) -> tuple[dict, dict, int]:
        """This rank's chunk (every chunk, merged, on one process) and the
        number of sequences in the whole batch.

        Every rank checks the whole batch, not just its chunk: all ranks must
        reach the same verdict, or those that go on wait forever in the
        gradient all-reduce for those that raised.
        """
        check_dp_chunks(inputs, targets)
        width = max(chunk["tokens"].shape[1] for chunk in inputs)
        if width > self.training.seq_len:
            raise ValueError(
                f"batch sequences are {width} tokens (request_len + "
                f"response_len) but training seq_len is {self.training.seq_len}; raise "
                "training['seq_len'] or use shorter episodes"
            )
        global_batch_size = sum(chunk["tokens"].shape[0] for chunk in inputs)
        if self.world_size == 1:
            merged_inputs, merged_targets = merge_dp_chunks(inputs, targets)
            return merged_inputs, merged_targets, global_batch_size
        if len(inputs) != self.world_size:
            raise ValueError(
                f"the batch has {len(inputs)} dp chunk(s) but the trainer has "
                f"{self.world_size} ranks (procs={self.world_size}); each rank trains on one "
                f"chunk, so create the replay buffer with dp_size={self.world_size}"
            )
        # DDP syncs the model's buffers in every forward, a collective: ranks
        # with different numbers of micro-batches would wait for each other.
        chunk_sizes = [chunk["tokens"].shape[0] for chunk in inputs]
        if len(set(chunk_sizes)) > 1:
            raise ValueError(
                f"the dp chunks hold {chunk_sizes} sequences; data-parallel ranks need "
                "chunks of one size (the replay buffer's collate makes them so)"
            )
        return inputs[self.rank], targets[self.rank], global_batch_size

    @endpoint
    async def push_weights(self, policy_version: int) -> None:
        """Publish the current weights as ``policy_version`` (HF parameter names).

        With procs > 1, call it on every rank (``call``): the weights are the
        same on all of them, so rank 0 writes them, and every rank returns
        only once the version is in the store.
        """
        if self.weight_store is None:
            raise RuntimeError(
                "this RLTrainer has no weight store: it was spawned without RLTrainer.as_actor, "
                "which gives it one; pass `weight_store=store` (the Policy's store) to it"
            )
        try:
            if self.rank == 0:
                if is_default(self.weight_store):  # one trainer at a time: see default_store
                    await self._publisher.check(self.weight_store)
                # Async, as either store allows: a WeightStore writes its file in
                # a thread; an ActorWeightStore keeps a copy in this process and
                # lists it with its server (one small message).
                await self.weight_store.aput(policy_version, self.model.state_dict())
        finally:
            # In `finally`, so that if rank 0 fails to write, the others are
            # released and the call reports rank 0's error.
            if self.world_size > 1:
                dist.barrier()

    @endpoint
    def state_dict(self) -> dict | None:
        """What a checkpoint needs to resume training where it stopped, on the CPU.

        Returns ``{"model": ..., "optimizer": ..., "scheduler": ..., "step": n}``:
        the model's state dict (HF names), the optimizer's (Adam's moments),
        the learning-rate schedule's, and ``n``, the optimizer steps taken so
        far. With procs > 1, call it on every rank (``call``): the ranks hold
        the same state, so rank 0 returns it and the others return None,
        which spares the controller ``procs - 1`` copies.

        Example: ``state = next(s for s in (await trainer.state_dict.call()).values() if s)``.
        """
        if self.rank != 0:
            return None
        return to_cpu({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.scheduler.last_epoch,  # the schedule counts the optimizer's steps
        })

    @endpoint
    def load_state_dict(self, state: dict) -> None:
        """Continue from what ``state_dict`` returned, under this trainer's own config.

        What the steps taken made is restored: the weights, the optimizer's
        per-parameter state (Adam's moments) and the step count ``n``. What
        a config defines is this trainer's, not the saved one's: the
        optimizer's settings (``lr``, ``weight_decay``, ...) and the learning
        rate schedule, which continues at step ``n`` as this trainer's
        ``lr_factor(n)`` says. A run resumed with more ``steps`` under
        ``decay_steps`` therefore trains step ``n`` at exactly the rate an
        uninterrupted run of the new length uses there, not at the rate the
        shorter schedule had reached (0, for a run that finished).

        Call it on every rank (``call``) with the same state, so the ranks
        stay identical. Raises ValueError if ``state`` lacks one of the four
        keys, and torch's RuntimeError if the weights are another model's.
        """
        missing = [key for key in ("model", "optimizer", "scheduler", "step") if key not in state]
        if missing:
            raise ValueError(f"RLTrainer.load_state_dict: the state lacks {missing}; pass what "
                             "state_dict() returned")
        self.model.load_state_dict(state["model"])
        # The saved param_groups hold the saved run's settings, and its lr is
        # where the saved schedule had got to: keep this trainer's settings.
        settings = [{key: value for key, value in group.items() if key != "params"}
                    for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])  # moves Adam's moments to the model's device
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        # The saved scheduler state (its last lr, its base lrs) is not loaded
        # for the same reason: a new schedule from this config, at step n,
        # sets the rate the next step uses to lr * lr_factor(n).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self.training.lr_factor, last_epoch=state["step"] - 1
        )


def accepts(function: Callable, name: str) -> bool:
    """Whether ``function`` (a partial too) takes a keyword argument ``name``."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature to read: pass only the four
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def to_cpu(value):
    """``value`` with every tensor in it (in dicts, lists and tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def free_port() -> int:
    """A TCP port that no process of this host is listening on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def interface_towards(host: str) -> str | None:
    """The name of this machine's network interface on the route to ``host``
    (``"lo"`` for 127.0.0.1); None if no interface has that address."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # chooses the route; nothing is sent
        mine = probe.getsockname()[0]
    return next((name for name, addresses in psutil.net_if_addrs().items()
                 if any(a.address == mine for a in addresses)), None)


def _meeting_host(trainer) -> str:
    """Where the ranks of ``trainer`` meet: loopback on one host, else the
    address of host 0 (rank 0's), as the cluster reached its worker."""
    placement = processes_of(trainer).placement
    if placement is None or len(placement.hosts) == 1:
        return "127.0.0.1"
    first = placement.hosts[0]
    return first.where.rpartition(":")[0] if first.address else first.facts["hostname"]


def check_dp_chunks(inputs: list[dict], targets: list[dict]) -> None:
    """``(inputs, targets)`` must be the collate's lists of per-rank chunks."""
    if not isinstance(inputs, list) or not isinstance(targets, list):
        raise TypeError(
            "train_step takes (inputs, targets), each a list with one dict per dp chunk, "
            "as the replay buffer returns them: `inputs, targets = batch`"
        )
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(
            f"inputs and targets need one dict per dp chunk each, got {len(inputs)} and "
            f"{len(targets)}"
        )


def merge_dp_chunks(inputs: list[dict], targets: list[dict]) -> tuple[dict, dict]:
    """One batch from the collate's per-rank chunks, concatenated along the batch."""

    def concat(chunks: list[dict]) -> dict:
        return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}

    return concat(inputs), concat(targets)
