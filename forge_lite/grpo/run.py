"""A whole GRPO run: start the services, train, evaluate, write the results.

From a notebook, in one call or one step per cell (``GRPORun``)::

    recorder = MetricsRecorder()
    result = await run_grpo(load_config("configs/grpo_tiny.yaml"), recorder=recorder)

From a terminal: ``python -m forge_lite.grpo --config configs/grpo_tiny.yaml``.
The loops themselves are in ``forge_lite.grpo.loop``.

A run with ``checkpoint_every: N`` saves a checkpoint every N steps, and
``resume=<its output_dir>`` continues it after a restart
(``forge_lite.grpo.checkpoint`` says what a checkpoint holds)::

    result = await run_grpo(resume="runs/grpo")

``GRPORun(..., evaluate_every=N, on_evaluation=callback)`` also measures the
held-out accuracy every N steps while it trains, the rollouts and the
training loop waiting meanwhile (``HeldoutEvaluation`` is what the callback
gets); ``benchmarks/grpo_vs_trl.py`` runs it so, and leaves those seconds
out of its clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from forge_lite.actors.weight_server import ActorWeightStore, describe_weight_store, open_weight_store, weight_store_label
from forge_lite.actors.weights import WeightStore
from forge_lite.controller.cluster import current as current_cluster
from forge_lite.grpo import checkpoint
from forge_lite.grpo.config import GRPOConfig, load_config
from forge_lite.grpo.dataset import DatasetActor
from forge_lite.grpo.evaluation import evaluate, load_eval_problems
from forge_lite.grpo.loop import rollout_loop, train_loop
from forge_lite.grpo.rollout import RolloutWindow
from forge_lite.grpo.multiturn import heldout_success
from forge_lite.grpo.recorder import MetricsRecorder, StepRecord
from forge_lite.grpo.results import GRPOResult, shown, write_outputs
from forge_lite.grpo.services import RunComponents, check_placement, shutdown_all, start_services
from forge_lite.paths import private_temp_dir


@dataclasses.dataclass(frozen=True)
class HeldoutEvaluation:
    """One held-out evaluation of ``GRPORun.train()`` (``GRPORun.evaluations``)."""

    step: int  # training steps taken before it: 0 (or a resumed run's first step) before training
    accuracy: float  # greedy accuracy on the held-out problems (multi-turn: success rate)
    seconds: float  # its wall time; the rollouts and the training loop waited meanwhile


class GRPORun:
    """One GRPO run, in the steps a notebook takes one cell at a time.

    Parameters
    ----------
    config:
        A ``GRPOConfig``, a dict of its fields, or the path of a YAML file
        (``configs/grpo_tiny.yaml``); None for the defaults.
    recorder:
        Where every step is recorded (a TrainingDashboard watches it); a new
        ``MetricsRecorder`` if None.
    resume:
        Continue the run whose checkpoints are in this directory: a run's
        output_dir, its ``checkpoints/`` folder, or one checkpoint
        (``forge_lite.grpo.checkpoint.find_checkpoint``). ``config`` None
        then means the checkpoint's config; a config that changes a key
        that cannot change mid-run (``checkpoint.FIXED_ON_RESUME``) is a
        ValueError naming the key and both values. Without a complete
        checkpoint in it, FileNotFoundError or ValueError, naming it.
    evaluate_every:
        Also measure the held-out accuracy after every N-th training step
        (besides before and after training). Meanwhile no new round of
        rollouts starts (the groups already generating finish) and the
        training loop waits, so the evaluation sees the weights of that
        step. None: only before and after. ValueError if it is not a
        positive int, or the config has ``eval_samples: 0``.
    on_evaluation:
        Called with a ``HeldoutEvaluation`` after each held-out evaluation
        (before, every ``evaluate_every`` steps, after), on the event loop,
        with the training paused; an exception it raises stops ``train()``
        (with the rollouts) and is raised there. TypeError if not callable.

    Notes
    -----
    ``start()`` starts every service (its log line says how long that took;
    ``benchmarks/grpo_vs_trl.py`` measures it beside TRL's start-up) and
    stops them all again if one fails; ``train()`` runs
    ``config.steps`` steps between two held-out evaluations (and one every
    ``evaluate_every`` steps); ``shutdown()``
    stops every process and deletes the run's weights (also after an
    error). ``run_grpo`` does all three in one call.

    Resumed, ``start()`` also restores the checkpoint (weights, the
    optimizer's moments and step count, buffer, dataset position, the
    recorder's steps; the learning rate and its schedule come from the
    resumed config) and
    ``train()`` runs steps ``start_step`` to ``config.steps - 1``.
    ``save_checkpoint()`` saves one by hand, after ``train()``.

    ``evaluations`` lists every held-out evaluation ``train()`` made
    (``HeldoutEvaluation``: step, accuracy, seconds), oldest first.

    Example
    -------
    ::

        run = await GRPORun("configs/grpo_tiny.yaml").start()
        ServiceDashboard(run.services.policy)
        result = await run.train()       # GRPOResult
        await run.shutdown()

        # after a restart: the same run, from its last checkpoint
        run = await GRPORun(resume="runs/grpo").start()
    """

    def __init__(self, config: GRPOConfig | dict | str | None = None,
                 recorder: MetricsRecorder | None = None,
                 resume: str | os.PathLike | None = None, *,
                 evaluate_every: int | None = None,
                 on_evaluation: Callable[[HeldoutEvaluation], None] | None = None) -> None:
        self.resume_from: Path | None = None  # the checkpoint this run continues
        self.start_step = 0  # the first step train() takes
        if resume is None:
            self.config = as_config(config)
        else:
            # Here, not in start(): a wrong directory or config fails before any process starts.
            self.resume_from = checkpoint.find_checkpoint(resume)
            self.config = checkpoint.resume_config(
                self.resume_from, None if config is None else as_config(config)
            )
            self.start_step = checkpoint.read_manifest(self.resume_from)["step"]
        if evaluate_every is not None and (
                isinstance(evaluate_every, bool) or not isinstance(evaluate_every, int) or evaluate_every < 1):
            raise ValueError(f"evaluate_every must be a positive int (steps) or None, got {evaluate_every!r}")
        if evaluate_every is not None and self.config.eval_samples == 0:
            raise ValueError(f"evaluate_every={evaluate_every} needs held-out problems, "
                             "but the config has eval_samples: 0")
        if on_evaluation is not None and not callable(on_evaluation):
            raise TypeError(f"on_evaluation must be callable, got {type(on_evaluation).__name__}")
        self.evaluate_every = evaluate_every
        self.on_evaluation = on_evaluation
        self.evaluations: list[HeldoutEvaluation] = []  # every held-out evaluation train() made
        self.recorder = MetricsRecorder() if recorder is None else recorder
        self.services: RunComponents | None = None
        self.store: WeightStore | ActorWeightStore | None = None
        self.eval_problems: list[dict] = []
        self.startup_s = 0.0
        self._began = 0.0
        self._previous_environment: dict[str, str | None] = {}
        self._rollouts: list[asyncio.Task] = []
        self._tracker = None  # a TensorBoardTracker with tracking: tensorboard
        self._untrack = None

    async def start(self) -> GRPORun:
        """Start every service (stopping them all again if one fails); returns self."""
        self.output_dir = make_output_dir(self.config.output_dir)
        # The directory made here is the run's, in its config too: the training
        # loop saves checkpoints under it, and a resumed run writes on there.
        self.config = config = dataclasses.replace(
            self.config, output_dir=os.path.abspath(self.output_dir)
        )
        self._began = time.perf_counter()
        if config.tracking == "tensorboard" and self._tracker is None:
            # Before any process starts: without the extra, the ImportError comes now.
            from forge_lite.grpo.tracking import TensorBoardTracker

            self._tracker = TensorBoardTracker(self.output_dir / "tensorboard")
            self._untrack = self.recorder.subscribe(self._tracker)
        check_placement(config)  # a host the cluster lacks: an error before any process starts
        # The run's own store, handed to its trainer and policy: a folder on one
        # host, the actor store across hosts (config.weights). Its WeightServer
        # only lists versions (the bytes go from the trainer to each host); it
        # runs beside the policy replicas, whose lookups it answers.
        self.store = await open_weight_store(config.weights, on_hosts=config.placement.hosts("policy"))
        print(f"GRPO: weights travel {describe_weight_store(self.store)}", flush=True)
        self.recorder.record_status(weights=weight_store_label(self.store))  # the dashboard's header says it too
        if config.threads_per_process is not None:
            self._set_environment({"OMP_NUM_THREADS": str(config.threads_per_process)})
        if self.resume_from is None and config.checkpoint_every:
            earlier = checkpoint.complete_checkpoints(self.output_dir / "checkpoints")
            if earlier:
                print(f"GRPO: {shown(self.output_dir)} holds an earlier run's checkpoints (last: "
                      f"{earlier[-1].name}); this run's checkpoints will replace them. To "
                      f"continue that run instead, pass resume={shown(self.output_dir)!r}", flush=True)
        try:
            print(f"GRPO: starting services (output in {shown(self.output_dir)})", flush=True)
            state, policy_version = None, None
            if self.resume_from is not None:
                began = time.perf_counter()
                # The policy replicas start on the checkpoint's weights, as its version.
                state = checkpoint.load_checkpoint(self.resume_from)
                policy_version = state["policy_version"]
                await self.store.aput(policy_version, state["trainer"]["model"])
                loading_s = time.perf_counter() - began
            self.services = await start_services(config, self.store, policy_version)
            if state is not None:
                began = time.perf_counter()
                await checkpoint.restore(self.services, state, self.recorder)
                loading_s += time.perf_counter() - began
                print(f"GRPO: resumed from {shown(self.resume_from)} at step {self.start_step} "
                      f"(read and restored in {loading_s:.2f} s)", flush=True)
            self.startup_s = time.perf_counter() - self._began
            self.pad_id = await self.services.dataloader.pad_token.call_one()
            if self.services.eval_data is not None:
                self.eval_problems = await load_eval_problems(self.services.eval_data, config.eval_samples)
                await DatasetActor.shutdown(self.services.eval_data)
                self.services.eval_data = None
            print(f"GRPO: services ready in {self.startup_s:.0f} s", flush=True)
            if not current_cluster().is_local:
                where = self.services.hosts()
                print("GRPO: placed " + "; ".join(f"{name} on {', '.join(where[name])}" for name in (
                    "policy", "ref_model", "reward_actor", "trainer") if name in where), flush=True)
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def evaluate(self) -> float | None:
        """Greedy accuracy on the held-out problems (None when eval_samples is 0)."""
        if not self.eval_problems:
            return None
        if self.config.env.name is not None:  # multi-turn: the environment's own held-out problems
            return await heldout_success(self.services, self.config)
        return await evaluate(self.services.policy, self.eval_problems, self.config.policy.max_tokens)

    async def train(self, on_interrupt: str = "return") -> GRPOResult:
        """Held-out accuracy, ``config.steps`` training steps, held-out accuracy again.

        Interrupted while it trains (Kernel > Interrupt in a notebook cancels
        the cell's task), it stops the rollouts, writes and returns the
        steps taken so far (no held-out evaluation after) and says what to
        do next: the services keep running, ``await run.train()`` continues
        from the next step, ``await run.shutdown()`` stops everything. With
        ``on_interrupt="raise"`` (``run_grpo``) it writes them, then raises
        the CancelledError. Interrupted before the first step, it raises.

        Raises RuntimeError if ``start()`` was not awaited first, ValueError
        for another ``on_interrupt``, and the error of a rollout task that failed.
        """
        if self.services is None:
            raise RuntimeError("GRPORun.train(): call `await run.start()` first")
        if on_interrupt not in ("return", "raise"):
            raise ValueError(f"on_interrupt must be 'return' or 'raise', not {on_interrupt!r}")
        config = self.config
        status = self.recorder.status
        if self.start_step and status.heldout_before is not None:
            accuracy_before = status.heldout_before  # continued after an interrupt: measured then
        else:
            self.recorder.record_status(total_steps=config.steps, state="evaluating")
            accuracy_before = await self._heldout(self.start_step)
        if accuracy_before is not None:
            print(f"GRPO: held-out greedy accuracy before training: {accuracy_before:.3f}", flush=True)
        self.recorder.record_status(total_steps=config.steps, state="training", heldout_before=accuracy_before)
        interrupted = False
        began = time.perf_counter()
        window = RolloutWindow(in_buffer=await self.services.replay_buffer.numel.call_one())
        recorded_before = len(self.recorder.steps)
        self._rollouts = [
            asyncio.create_task(rollout_loop(self.services, config, self.pad_id, window))
            for _ in range(config.num_rollout_tasks)
        ]
        with tqdm(total=config.steps, initial=self.start_step, desc="GRPO", unit="step",
                  dynamic_ncols=True, disable=not show_progress(config.progress)) as bar:
            unsubscribe = self.recorder.subscribe(progress_listener(bar), replay=False)
            try:
                await self._train_steps(window)
            except asyncio.CancelledError:
                if len(self.recorder.steps) == recorded_before:  # no step taken: nothing to keep
                    self.recorder.record_status(state="interrupted")
                    raise
                interrupted = True
                asyncio.current_task().uncancel()  # handled here: later awaits run normally
            finally:
                unsubscribe()
                await cancel_all(self._rollouts)
        train_s = time.perf_counter() - began
        if interrupted:
            self.start_step = self.recorder.steps[-1].step + 1  # where train() would continue
            self.recorder.record_status(state="interrupted")
            accuracy_after = None
        else:
            self.recorder.record_status(state="evaluating")
            accuracy_after = await self._heldout(config.steps)
            self.recorder.record_status(state="finished", heldout_after=accuracy_after)

        result = GRPOResult(
            config=config, recorder=self.recorder, eval_accuracy_before=accuracy_before,
            eval_accuracy_after=accuracy_after, startup_s=self.startup_s, train_s=train_s,
            wall_s=time.perf_counter() - self._began, output_dir=str(self.output_dir),
            steps_trained=len(self.recorder.steps) - recorded_before,
        )
        write_outputs(result, self.output_dir)
        print(result.summary(), flush=True)
        if interrupted:
            print(f"GRPO: interrupted at step {self.start_step} of {config.steps}; the result holds "
                  f"the {len(self.recorder.steps)} steps recorded", flush=True)
            if on_interrupt == "raise":
                raise asyncio.CancelledError
            print(f"The services are still running. To go on training from step {self.start_step}: "
                  f"`result = await run.train()`. To stop every process: `await run.shutdown()`.",
                  flush=True)
        return result

    async def _train_steps(self, window: RolloutWindow) -> None:
        """The training loop from ``start_step`` to ``config.steps``, stopping
        for a held-out evaluation every ``evaluate_every`` steps: no new round
        of rollouts starts meanwhile, and the training loop waits for it."""

        async def evaluate_if_due(steps_done: int) -> None:
            # train() evaluates after the last step itself.
            if steps_done % self.evaluate_every or steps_done >= self.config.steps:
                return
            window.pause()
            try:
                self.recorder.record_status(state="evaluating")
                await self._heldout(steps_done)
                self.recorder.record_status(state="training")
            finally:
                window.resume()

        await train_loop(self.services, self.config, self.recorder, window, self._rollouts, self.store,
                         start_step=self.start_step,
                         after_step=None if self.evaluate_every is None else evaluate_if_due,
                         after_every=self.evaluate_every or 1)

    async def _heldout(self, step: int) -> float | None:
        """``evaluate()``, timed, kept in ``evaluations`` and given to ``on_evaluation``."""
        began = time.perf_counter()
        accuracy = await self.evaluate()
        if accuracy is None:
            return None
        evaluation = HeldoutEvaluation(step, accuracy, time.perf_counter() - began)
        self.evaluations.append(evaluation)
        if self.on_evaluation is not None:
            self.on_evaluation(evaluation)
        return accuracy

    async def save_checkpoint(self) -> Path:
        """Save a checkpoint of the run now, between ``train()`` and ``shutdown()``
        (a run with ``checkpoint_every`` saves them by itself while it trains).

        Returns its path, ``<output_dir>/checkpoints/step-NNNNNN``, where
        NNNNNN is the number of steps taken; ``GRPORun(..., resume=<output_dir>)``
        continues from it. Raises RuntimeError before ``start()`` or after
        ``shutdown()``.
        """
        if self.services is None:
            raise RuntimeError("GRPORun.save_checkpoint(): the run's services are not running; "
                               "call it after `await run.start()` and before `run.shutdown()`")
        last = self.recorder.steps[-1] if self.recorder.steps else None
        steps_done = last.step + 1 if last else self.start_step
        version = last.trainer_version if last else self.start_step
        return await checkpoint.save_checkpoint(self.services, self.config, self.recorder,
                                                steps_done, version)

    async def shutdown(self) -> None:
        """Stop every service and actor, delete the run's weights; safe to call twice."""
        await cancel_all(self._rollouts)
        if self._tracker is not None:  # its event file complete on disk
            self._untrack()
            self._tracker.close()
            self._tracker = None
        if self.services is not None:
            await shutdown_all(vars(self.services).values())
            self.services = None
        if self.store is not None:
            await self.store.aclose()
            self.store = None
        for name, value in self._previous_environment.items():  # as before start()
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._previous_environment = {}

    def _set_environment(self, values: dict[str, str]) -> None:
        """Set variables for the processes this run spawns, remembering the
        values to put back at shutdown."""
        for name, value in values.items():
            self._previous_environment.setdefault(name, os.environ.get(name))
            os.environ[name] = value


async def run_grpo(
    config: GRPOConfig | dict | str | None = None, recorder: MetricsRecorder | None = None,
    resume: str | os.PathLike | None = None,
) -> GRPOResult:
    """Train with GRPO as ``config`` says and return the ``GRPOResult``.

    Parameters are ``GRPORun``'s: ``resume=DIR`` continues the run whose
    checkpoints are in DIR. Every service is stopped when it returns or
    fails (Ctrl-C included). Raises ValueError for a config with unknown or
    invalid settings, or one that cannot resume DIR's run, and whatever
    stopped the run.

    Example: ``result = await run_grpo("configs/grpo_tiny.yaml")``, then
    ``print(result.summary())``; after a crash, ``await run_grpo(resume=result.output_dir)``
    (with ``checkpoint_every`` set in the config).
    """
    run = GRPORun(config, recorder, resume)
    try:
        await run.start()
        result = await run.train(on_interrupt="raise")  # the partial result is written, then raised
    finally:
        await run.shutdown()
    return result


def progress_listener(bar: tqdm):
    """A recorder listener that moves a tqdm bar one step per StepRecord."""

    def on_record(record) -> None:
        if isinstance(record, StepRecord):
            bar.set_postfix(
                reward=f"{record.reward_mean:.3f}", acc=f"{record.accuracy:.2f}",
                loss=f"{record.loss:.4f}", kl=f"{record.kl:.4f}", refresh=False,
            )
            bar.update(1)

    return on_record


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def as_config(config: GRPOConfig | dict | str | os.PathLike | None) -> GRPOConfig:
    """A GRPOConfig from a config, a dict of its fields, or a YAML path."""
    if isinstance(config, GRPOConfig):
        return config
    if config is None or isinstance(config, dict):
        return GRPOConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(f"config must be a GRPOConfig, a dict or a YAML path, got {type(config).__name__}")


def make_output_dir(output_dir: str | None) -> Path:
    """``output_dir``, or a fresh ``<tmp>/forge_lite-<uid>/runs/grpo-<time>-<id>``
    (in the user's private temporary folder: see ``forge_lite.paths``)."""
    if output_dir is None:
        root = private_temp_dir() / "runs"
        root.mkdir(mode=0o700, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=time.strftime("grpo-%Y%m%d-%H%M%S-"), dir=root))
    path = Path(output_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def show_progress(setting: bool | None) -> bool:
    return sys.stderr.isatty() if setting is None else setting
