"""What a GRPO run did, step by step, for the terminal, plots and widgets.

The training loop calls ``record_step(...)`` once per optimiser step and
``record_versions(...)`` when policy replicas change weights; the run itself
calls ``record_status(...)`` for what concerns the whole run (the steps it
will take, the held-out accuracy before and after, whether it was
interrupted). Listeners (a TrainingDashboard, a tqdm bar) subscribe;
``steps`` keeps the whole run, which is small (one row per step). A listener
that raises is reported once and does not stop the run or the other listeners.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
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
    # Response tokens the rollouts generated since the previous step, per
    # second of that window: 0.0 when they all waited (the buffer already
    # held this step's batch, see RolloutWindow.room).
    tokens_per_s: float
    step_time_s: float  # seconds since the previous step
    time_split_s: dict = field(default_factory=dict)  # seconds per phase (PHASES)
    skipped_groups: int = 0  # groups with equal rewards left out of the buffer since the previous step
    # Share of the batch's importance ratios (tokens; sequences under GSPO)
    # whose gradient the loss's clip changed: how stale or how far the policy
    # moved. NaN for a loss without a clip (SAPO).
    clip_fraction: float = float("nan")
    # Share of the groups scored since the previous step whose rewards were
    # all equal (TRL's frac_reward_zero_std): their advantages are 0, so
    # they teach nothing. Near 1, the loss sits at 0 whatever the model
    # does: watch the reward, not the loss. NaN when no group was scored.
    zero_std_fraction: float = float("nan")
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


@dataclass(frozen=True)
class RunStatus:
    """The run as a whole: what a dashboard's header says beside the last step."""

    total_steps: int | None = None  # the step count the run ends at (a dashboard's "step N/total")
    state: str = "starting"  # "evaluating", "training", "interrupted" or "finished"
    heldout_before: float | None = None  # held-out greedy accuracy before training
    heldout_after: float | None = None  # ... and after
    # How the trainer's weights reach the policy replicas, e.g. "files (one
    # host)" or "actor (Monarch messages)" (weight_server.weight_store_label);
    # None until the run has opened its store.
    weights: str | None = None
    time: float = field(default_factory=time.time)


Listener = Callable[[object], None]


class MetricsRecorder:
    """What a GRPO run measured, in the kernel, as it happens: one
    ``StepRecord`` per training step (``steps``), one ``VersionRecord`` per
    weight sync (``versions``), and the run's ``RunStatus`` (``status``).

    The run records; dashboards, the tracker and the results files read.
    Everything is plain data in this process: ``run.recorder.steps[-1]``
    answers "what did the last step do" without touching any actor. A
    listener (``subscribe``) is called on the kernel's event loop for every
    new record; one that raises is reported once and never stops the run.
    """

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.versions: list[VersionRecord] = []
        self.status = RunStatus()
        self._listeners: list[Listener] = []
        self._errors = CallbackErrors("recorder listener")

    def subscribe(self, listener: Listener, replay: bool = False) -> Callable[[], None]:
        """Call ``listener(record)`` for every record from now on (with
        ``replay=True``, first for those already recorded, oldest first, as
        ``EventStream.subscribe`` does); returns an unsubscribe function."""
        if replay:
            for record in sorted(self.steps + self.versions, key=lambda r: r.time):
                self._errors.call(listener, record)
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _publish(self, record) -> None:
        for listener in tuple(self._listeners):
            self._errors.call(listener, record)

    def record_step(self, **values) -> StepRecord:
        """Append one training step, given as ``StepRecord``'s fields (``step``,
        the phase times in seconds, the reward, loss and KL means, ...), tell
        every listener, and return the record. Raises TypeError for a field
        ``StepRecord`` does not have."""
        record = StepRecord(**values)
        self.steps.append(record)
        self._publish(record)
        return record

    def record_versions(self, step: int, trainer_version: int, replica_versions) -> VersionRecord:
        """Append which weight version the trainer published after ``step`` and
        which each policy replica serves (in replica order), tell every
        listener, and return the record."""
        record = VersionRecord(step, trainer_version, tuple(replica_versions))
        self.versions.append(record)
        self._publish(record)
        return record

    def record_status(self, **changes) -> RunStatus:
        """Change some of the run's ``RunStatus`` fields, e.g.
        ``record_status(state="training", heldout_before=0.645)``."""
        self.status = replace(self.status, time=time.time(), **changes)
        self._publish(self.status)
        return self.status

    def load(self, steps, versions=()) -> None:
        """Replace the history with ``steps`` and ``versions``: how a resumed
        run gets its earlier steps back, so its curve continues.

        Each item is a StepRecord / VersionRecord or a dict of its fields (as
        a checkpoint's JSON holds them: lists where the records hold tuples).
        Listeners hear of every loaded record, oldest first, so a dashboard
        already watching redraws. Raises TypeError for an unknown field.

        Example: ``recorder.load([record.as_dict() for record in old.steps])``.
        """

        def as_record(kind, item):
            if isinstance(item, kind):
                return item
            values = dict(item)
            for name in ("episode_ages", "replica_versions"):  # JSON gives lists
                if name in values:
                    values[name] = tuple(values[name])
            return kind(**values)

        self.steps = [as_record(StepRecord, item) for item in steps]
        self.versions = [as_record(VersionRecord, item) for item in versions]
        for record in sorted(self.steps + self.versions, key=lambda r: r.time):
            self._publish(record)

    def series(self, name: str) -> list:
        """One column of the step table, e.g. ``series("reward_mean")``."""
        return [getattr(s, name) for s in self.steps]


def trailing_mean(values: list[float], width: int) -> list[float]:
    """Mean of each value and up to ``width - 1`` values before it: a step's
    reward is noise around the trend, which this shows."""
    return [sum(values[max(0, i - width + 1): i + 1]) / min(width, i + 1) for i in range(len(values))]
