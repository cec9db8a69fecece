"""RLTrainer: one optimizer step per batch, then publish the weights.

The trainer owns the policy's trainable copy. ``train_step(inputs, targets)``
takes the replay buffer's batch (the GRPO collate's format: one dict per
data-parallel chunk), recomputes the response logprobs with gradients, applies
the loss (GRPO by default), clips the gradient and steps the optimizer.
``push_weights(policy_version)`` writes the weights, under their Hugging Face
names, to the weight store, where the Policy replicas load them.

The trainer runs on one process. A batch with several dp chunks is trained
as one: with equal chunks and a loss that averages over sequences, the
concatenated batch has the same gradient as dp_size ranks averaging theirs.
Data parallelism across processes is not implemented in forge_lite.

Configuration is the tutorial's three dicts:

    model={"name": "qwen3", "flavor": "1.7B", "hf_assets_path": "hf://Qwen/Qwen3-1.7B"}
    optimizer={"name": "AdamW", "lr": 1e-5}           # any torch.optim class, its kwargs
    training={"local_batch_size": 2, "seq_len": 2048}  # see TrainingConfig
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch

from forge_lite.actors.hf_model import causal_lm_logits, load_causal_lm
from forge_lite.actors.weights import WEIGHTS_DIR_ENV, WeightStore
from forge_lite.controller import ForgeActor
from forge_lite.grpo.loss import grpo_loss, response_logprobs
from monarch.actor import current_size, endpoint


@dataclass
class TrainingConfig:
    """The tutorial's ``training`` dict."""

    # Sequences per forward/backward pass. A larger batch is split into
    # micro-batches of this size whose gradients add up to the full batch's,
    # so it bounds memory, not the batch. None: the whole batch at once.
    local_batch_size: int | None = None
    # Longest sequence (request_len + response_len) the trainer accepts.
    seq_len: int = 2048
    # Gradient norm clip; GRPO's advantages can be large for small groups.
    max_norm: float = 1.0
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, config: dict | None) -> TrainingConfig:
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(config or {}) - set(known))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known options: {known}")
        return cls(**(config or {}))


class RLTrainer(ForgeActor):
    """Trains the policy model with a loss ``loss(logprobs, ref_logprobs, advantages,
    padding_mask) -> scalar`` (GRPO by default)."""

    def __init__(
        self,
        model: str | dict | None = None,
        optimizer: dict | None = None,
        training: dict | None = None,
        loss: Callable[..., torch.Tensor] = grpo_loss,
    ):
        self.model_spec = model
        self.optimizer_config = {"name": "AdamW", "lr": 1e-5, **(optimizer or {})}
        self.training_config = training
        self.loss = loss

    # Configuration is checked here rather than in __init__: an error in setup
    # reaches the caller of as_actor as itself (a ValueError).
    @endpoint
    async def setup(self) -> None:
        processes = 1
        for size in current_size().values():
            processes *= size
        if processes != 1:
            raise ValueError(
                f"RLTrainer runs on one process, got procs={processes}: data parallel "
                "training across processes is not implemented in forge_lite. Use procs=1; "
                "it trains on every dp chunk of a batch."
            )
        self.training = TrainingConfig.from_dict(self.training_config)
        self.model = load_causal_lm(self.model_spec, self.training.dtype)
        self.model.train()
        self.optimizer = build_optimizer(self.model.parameters(), self.optimizer_config)

    @endpoint
    def train_step(self, inputs: list[dict], targets: list[dict]) -> float:
        """One optimizer step on the batch; returns its loss before the step."""
        batch, target = merge_dp_chunks(inputs, targets)
        device = next(self.model.parameters()).device
        tokens = batch["tokens"].to(device)
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        if tokens.shape[1] > self.training.seq_len:
            raise ValueError(
                f"batch sequences are {tokens.shape[1]} tokens (request_len + response_len) "
                f"but training seq_len is {self.training.seq_len}; raise training['seq_len'] "
                "or use shorter episodes"
            )
        # The collate puts every response at the same column.
        request_len = tokens.shape[1] - target["response"].shape[1]
        loss_inputs = {
            key: target[key].to(device) for key in ("ref_logprobs", "advantages", "padding_mask")
        }

        batch_size = tokens.shape[0]
        micro = self.training.local_batch_size or batch_size
        self.optimizer.zero_grad(set_to_none=True)
        batch_loss = 0.0
        for start in range(0, batch_size, micro):
            rows = slice(start, start + micro)
            logits = causal_lm_logits(
                self.model, tokens[rows], None if attention_mask is None else attention_mask[rows]
            )
            logprobs = response_logprobs(logits, tokens[rows], request_len)
            loss = self.loss(logprobs, **{key: value[rows] for key, value in loss_inputs.items()})
            # The loss is a mean over a micro-batch's sequences; weighting it by
            # the micro-batch's share makes the summed gradients the batch mean's.
            share = logprobs.shape[0] / batch_size
            (loss * share).backward()
            batch_loss += loss.item() * share
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.training.max_norm)
        self.optimizer.step()
        return batch_loss

    @endpoint
    def push_weights(self, policy_version: int) -> None:
        """Publish the current weights as ``policy_version`` (HF parameter names)."""
        # Without the variable, WeightStore() would make a directory of its
        # own that no Policy replica reads: the weights would silently go nowhere.
        if not os.environ.get(WEIGHTS_DIR_ENV):
            raise RuntimeError(
                f"no weight store: {WEIGHTS_DIR_ENV} is not set in the trainer's process. "
                "Create forge_lite.actors.weights.WeightStore() in the controller (notebook) "
                "before starting the trainer and the policy, so they share one directory"
            )
        WeightStore().put(policy_version, self.model.state_dict())


def build_optimizer(parameters, config: dict) -> torch.optim.Optimizer:
    """``{"name": "AdamW", "lr": 1e-5, ...}`` -> ``torch.optim.AdamW(parameters, lr=1e-5, ...)``."""
    options = dict(config)
    name = options.pop("name")
    optimizer_class = getattr(torch.optim, name, None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"optimizer name {name!r} is not a torch.optim optimizer (e.g. 'AdamW')")
    return optimizer_class(parameters, **options)


def merge_dp_chunks(inputs: list[dict], targets: list[dict]) -> tuple[dict, dict]:
    """One batch from the collate's per-rank chunks, concatenated along the batch."""
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

    def concat(chunks: list[dict]) -> dict:
        return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}

    return concat(inputs), concat(targets)
