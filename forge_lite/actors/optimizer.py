"""The trainer's optimizer and learning-rate schedule, built from the tutorial's dicts.

``RLTrainer`` takes ``optimizer={"name": "AdamW", "lr": 1e-5}`` (any
``torch.optim`` class and its keyword arguments) and ``training={...}`` (a
``TrainingConfig``: micro-batch size, sequence length, gradient clip, dtype
and the learning rate's schedule). Here is what those dicts become:

    training = TrainingConfig.from_dict({"warmup_steps": 2, "decay_steps": 10})
    optimizer = build_optimizer(model.parameters(), {"name": "AdamW", "lr": 1e-5})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_factor)

The schedule is a function of the step alone (``TrainingConfig.lr_factor``),
so a trainer restored at step n continues at its own config's rate for step
n (``RLTrainer.load_state_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class TrainingConfig:
    """The tutorial's ``training`` dict: ``RLTrainer(training={...})``'s options."""

    # Sequences per forward/backward pass. A larger batch is split into
    # micro-batches of this size whose gradients add up to the full batch's,
    # so it bounds memory, not the batch. None: the whole batch at once.
    # With procs > 1 it applies to each rank's chunk.
    local_batch_size: int | None = None
    # Longest sequence (request_len + response_len) the trainer accepts.
    seq_len: int = 2048
    # Gradient norm clip; GRPO's advantages can be large for small groups.
    max_norm: float = 1.0
    dtype: str = "float32"
    # Learning rate rises linearly to its value over this many steps: Adam's
    # first updates move every weight by about lr whatever the gradient.
    warmup_steps: int = 0
    # Then, if set, the learning rate falls linearly to 0 at this step. On a
    # noisy RL gradient a constant rate keeps the weights wandering once the
    # reward has stopped climbing; a falling one lets them settle.
    decay_steps: int | None = None
    # torch's CPU threads in the trainer's process; None: the process's
    # setting (OMP_NUM_THREADS). The trainer is the heaviest process of a
    # GRPO run on CPU, so it may get more threads than the others.
    num_threads: int | None = None

    def lr_factor(self, step: int) -> float:
        """The learning rate at optimizer step ``step`` (from 0), as a share of ``lr``."""
        factor = min(1.0, (step + 1) / (self.warmup_steps + 1))
        if self.decay_steps:
            factor *= max(0.0, 1.0 - step / self.decay_steps)
        return factor

    @classmethod
    def from_dict(cls, config: dict | None) -> TrainingConfig:
        """The options of ``config`` (None: every default); a ValueError names unknown ones."""
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(config or {}) - set(known))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known options: {known}")
        return cls(**(config or {}))


def build_optimizer(parameters, config: dict) -> torch.optim.Optimizer:
    """``{"name": "AdamW", "lr": 1e-5, ...}`` -> ``torch.optim.AdamW(parameters, lr=1e-5, ...)``.

    Raises ValueError if ``name`` is not a ``torch.optim`` optimizer class.
    """
    options = dict(config)
    name = options.pop("name")
    optimizer_class = getattr(torch.optim, name, None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"optimizer name {name!r} is not a torch.optim optimizer (e.g. 'AdamW')")
    return optimizer_class(parameters, **options)
