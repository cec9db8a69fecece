"""What a GRPO run did, step by step, for the terminal, plots and widgets.

The training loop calls ``record_step(...)`` once per optimiser step and
``record_versions(...)`` when policy replicas change weights. Listeners (a
TrainingDashboard, a tqdm bar) subscribe; ``steps`` keeps the whole run,
which is small (one row per step). A listener that raises is reported once
and does not stop the run or the other listeners.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from forge_lite.controller.service.events import CallbackErrors


#: The phases a step's time is split into (``StepRecord.time_split_s``): the
#: rollout tasks' (summed over tasks) and the training loop's.
PHASES = ("generate", "reward", "reference", "train", "sync")


@dataclass(frozen=True)
class StepRecord:
    """One training step."""

    step: int
    reward_mean: float  # over the responses scored since the previous step
    accuracy: float  # share of those responses whose answer was right
    loss: float
    kl: float
    trainer_version: int  # the policy version the trainer will publish after this step
    episode_ages: tuple[int, ...]  # trainer version minus each sampled episode's version
    buffer_size: int
    tokens_per_s: float
    step_time_s: float
    time_split_s: dict = field(default_factory=dict)  # seconds per phase (PHASES)
    skipped_groups: int = 0  # groups with equal rewards left out of the buffer since the previous step
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VersionRecord:
    """The weight versions the policy replicas serve, after a sync."""

    step: int
    trainer_version: int
    replica_versions: tuple[int, ...]
    time: float = field(default_factory=time.time)


Listener = Callable[[object], None]


class MetricsRecorder:
    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.versions: list[VersionRecord] = []
        self._listeners: list[Listener] = []
        self._errors = CallbackErrors("recorder listener")

    def subscribe(self, listener: Listener, replay: bool = True) -> Callable[[], None]:
        """Call ``listener(record)`` for every record; returns an unsubscribe function."""
        if replay:
            for record in sorted(self.steps + self.versions, key=lambda r: r.time):
                self._errors.call(listener, record)
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _publish(self, record) -> None:
        for listener in tuple(self._listeners):
            self._errors.call(listener, record)

    def record_step(self, **values) -> StepRecord:
        record = StepRecord(**values)
        self.steps.append(record)
        self._publish(record)
        return record

    def record_versions(self, step: int, trainer_version: int, replica_versions) -> VersionRecord:
        record = VersionRecord(step, trainer_version, tuple(replica_versions))
        self.versions.append(record)
        self._publish(record)
        return record

    def series(self, name: str) -> list:
        """One column of the step table, e.g. ``series("reward_mean")``."""
        return [getattr(s, name) for s in self.steps]


def trailing_mean(values: list[float], width: int) -> list[float]:
    """Mean of each value and up to ``width - 1`` values before it: a step's
    reward is noise around the trend, which this shows."""
    return [sum(values[max(0, i - width + 1): i + 1]) / min(width, i + 1) for i in range(len(values))]
