"""A whole GRPO run: start the services, train, evaluate, write the results.

From a notebook, in one call or one step per cell (``GRPORun``)::

    recorder = MetricsRecorder()
    result = await run_grpo(load_config("configs/grpo_tiny.yaml"), recorder=recorder)

From a terminal: ``python -m forge_lite.grpo --config configs/grpo_tiny.yaml``.
The loops themselves are in ``forge_lite.grpo.loop``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from forge_lite.actors.weights import WeightStore
from forge_lite.grpo.config import GRPOConfig, load_config
from forge_lite.grpo.dataset import DatasetActor
from forge_lite.grpo.evaluation import evaluate, load_eval_problems
from forge_lite.grpo.loop import RolloutWindow, rollout_loop, train_loop
from forge_lite.grpo.recorder import MetricsRecorder, StepRecord
from forge_lite.grpo.results import GRPOResult, write_outputs
from forge_lite.grpo.services import Services, shutdown_all, start_services


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

    Notes
    -----
    ``start()`` starts every service (about 10 s for the tiny config on 2
    cores) and stops them all again if one fails; ``train()`` runs
    ``config.steps`` steps between two held-out evaluations; ``shutdown()``
    stops every process and deletes the run's weights (also after an
    error). ``run_grpo`` does all three in one call.

    Example
    -------
    ::

        run = await GRPORun("configs/grpo_tiny.yaml").start()
        ServiceDashboard(run.services.policy)
        result = await run.train()       # GRPOResult
        await run.shutdown()
    """

    def __init__(self, config: GRPOConfig | dict | str | None = None,
                 recorder: MetricsRecorder | None = None) -> None:
        self.config = as_config(config)
        self.recorder = MetricsRecorder() if recorder is None else recorder
        self.services: Services | None = None
        self.store: WeightStore | None = None
        self.eval_problems: list[dict] = []
        self.startup_s = 0.0
        self._began = 0.0
        self._previous_environment: dict[str, str | None] = {}
        self._rollouts: list[asyncio.Task] = []

    async def start(self) -> GRPORun:
        """Start every service (stopping them all again if one fails); returns self."""
        config = self.config
        self.output_dir = make_output_dir(config.output_dir)
        self._began = time.perf_counter()
        self.store = WeightStore()  # the run's own, handed to its trainer and policy
        if config.threads_per_process is not None:
            self._set_environment({"OMP_NUM_THREADS": str(config.threads_per_process)})
        try:
            print(f"GRPO: starting services (output in {self.output_dir})", flush=True)
            self.services = await start_services(config, self.store)
            self.startup_s = time.perf_counter() - self._began
            self.pad_id = await self.services.dataloader.pad_token.call_one()
            if self.services.eval_data is not None:
                self.eval_problems = await load_eval_problems(self.services.eval_data, config.eval_samples)
                await DatasetActor.shutdown(self.services.eval_data)
                self.services.eval_data = None
            print(f"GRPO: services ready in {self.startup_s:.0f} s", flush=True)
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def evaluate(self) -> float | None:
        """Greedy accuracy on the held-out problems (None when eval_samples is 0)."""
        if not self.eval_problems:
            return None
        return await evaluate(self.services.policy, self.eval_problems, self.config.policy.max_tokens)

    async def train(self) -> GRPOResult:
        """Held-out accuracy, ``config.steps`` training steps, held-out accuracy again.

        Raises RuntimeError if ``start()`` was not awaited first, and the
        error of a rollout task that failed.
        """
        if self.services is None:
            raise RuntimeError("GRPORun.train(): call `await run.start()` first")
        config = self.config
        accuracy_before = await self.evaluate()
        if accuracy_before is not None:
            print(f"GRPO: held-out greedy accuracy before training: {accuracy_before:.3f}", flush=True)
        began = time.perf_counter()
        window = RolloutWindow()
        self._rollouts = [
            asyncio.create_task(rollout_loop(self.services, config, self.pad_id, window))
            for _ in range(config.num_rollout_tasks)
        ]
        with tqdm(total=config.steps, desc="GRPO", unit="step", dynamic_ncols=True,
                  disable=not show_progress(config.progress)) as bar:
            unsubscribe = self.recorder.subscribe(progress_listener(bar), replay=False)
            try:
                await train_loop(self.services, config, self.recorder, window, self._rollouts, self.store)
            finally:
                unsubscribe()
                await cancel_all(self._rollouts)
        train_s = time.perf_counter() - began
        accuracy_after = await self.evaluate()

        result = GRPOResult(
            config=config, recorder=self.recorder, eval_accuracy_before=accuracy_before,
            eval_accuracy_after=accuracy_after, startup_s=self.startup_s, train_s=train_s,
            wall_s=time.perf_counter() - self._began, output_dir=str(self.output_dir),
        )
        write_outputs(result, self.output_dir)
        print(result.summary(), flush=True)
        return result

    async def shutdown(self) -> None:
        """Stop every service and actor, delete the run's weights; safe to call twice."""
        await cancel_all(self._rollouts)
        if self.services is not None:
            await shutdown_all(vars(self.services).values())
            self.services = None
        if self.store is not None:
            self.store.close()
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
    config: GRPOConfig | dict | str | None = None, recorder: MetricsRecorder | None = None
) -> GRPOResult:
    """Train with GRPO as ``config`` says and return the ``GRPOResult``.

    Parameters are ``GRPORun``'s. Every service is stopped when it returns
    or fails (Ctrl-C included). Raises ValueError for a config with unknown
    or invalid settings, and whatever stopped the run.

    Example: ``result = await run_grpo("configs/grpo_tiny.yaml")``, then
    ``print(result.summary())``.
    """
    run = GRPORun(config, recorder)
    try:
        await run.start()
        result = await run.train()
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
    """``output_dir``, or a fresh ``<tmp>/forge_lite_runs/grpo-<time>-<id>``."""
    if output_dir is None:
        root = Path(tempfile.gettempdir()) / "forge_lite_runs"
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=time.strftime("grpo-%Y%m%d-%H%M%S-"), dir=root))
    path = Path(output_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def show_progress(setting: bool | None) -> bool:
    return sys.stderr.isatty() if setting is None else setting
