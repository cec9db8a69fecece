"""The components of a GRPO run: started together, stopped together.

``RunComponents`` names each one and says what it is: a *service* (replicas
behind ``route`` / ``fanout``: the policy, the reference model, the reward
functions) or an *actor* (one process mesh, called with Monarch's
``call_one`` / ``call``: the dataset, the trainer, the replay buffer, the
advantage computation).

On a cluster (``forge_lite.attach_cluster``) the config's ``placement``
section puts the policy, the reference model, the reward service and the
trainer on the hosts it names (``options(on_hosts=...)``); the kit spreads
the rest, least-occupied host first. ``RunComponents.hosts()`` says where each
component ended up.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from dataclasses import dataclass

from monarch._src.actor.actor_mesh import ActorMesh

from forge_lite.actors.policy import Policy
from forge_lite.actors.reference_model import ReferenceModel
from forge_lite.actors.replay_buffer import ReplayBuffer
from forge_lite.actors.trainer import RLTrainer
from forge_lite.actors.weights import WeightStore
from forge_lite.controller import ForgeActor
from forge_lite.controller.actor import processes_of
from forge_lite.controller.cluster import current as current_cluster
from forge_lite.controller.service import ServiceInterface
from forge_lite.data.rewards import REWARD_FUNCTIONS
from forge_lite.envs.actor import EnvironmentActor
from forge_lite.grpo.advantages import ComputeAdvantages
from forge_lite.grpo.config import PLACED_COMPONENTS, GRPOConfig
from forge_lite.grpo.dataset import DatasetActor
from forge_lite.rl.loss import policy_loss
from forge_lite.grpo.reward_actor import RewardActor


@dataclass
class RunComponents:
    """Every actor and service of a run (``eval_data`` is gone once read).

    Named for what it holds, a run's *components*, so as not to be taken for
    a ``Service``; code calls an instance ``s`` and a run keeps it as
    ``run.services`` (most of its parts are services)."""

    dataloader: ActorMesh  # DatasetActor: sample(), pad_token()
    policy: ServiceInterface  # Policy: generate(), update_weights(), get_version()
    trainer: ActorMesh  # RLTrainer: train_step(), push_weights()
    replay_buffer: ActorMesh  # ReplayBuffer: add(), sample(), numel()
    compute_advantages: ActorMesh  # ComputeAdvantages: compute()
    ref_model: ServiceInterface | None  # ReferenceModel: forward(); None with ref_model.kl_samples 0
    reward_actor: ServiceInterface  # RewardActor: evaluate_response()
    eval_data: ActorMesh | None = None  # DatasetActor on the held-out split
    env: ServiceInterface | None = None  # EnvironmentActor (multi-turn runs): sample_problem(), reset(), step()

    def hosts(self) -> dict[str, list[str]]:
        """Where each running component is: ``{"policy": ["host1", "host1"],
        "trainer": ["host0"], ...}``, one host name per replica of a service
        (its current host: a replica whose host was lost runs elsewhere) and
        one for an actor (``"host0+host1"`` for a mesh over two); ``"local"``
        on this machine alone."""
        where = {}
        for name, handle in vars(self).items():
            if handle is None:
                continue
            if isinstance(handle, ServiceInterface):
                where[name] = [replica.host for replica in handle.replicas]
            else:
                placement = getattr(processes_of(handle), "placement", None)
                where[name] = [placement.name if placement is not None else "local"]
        return where


def check_placement(config: GRPOConfig) -> None:
    """Raise ValueError, naming the cluster's hosts, if ``config.placement``
    names a host the current cluster does not have: before anything starts."""
    cluster = current_cluster()
    for component in PLACED_COMPONENTS:
        names = config.placement.hosts(component)
        if names is not None:
            cluster.choose_among(names, 1, f"placement.{component}")


async def start_services(
    config: GRPOConfig, store: WeightStore, policy_version: int | None = None
) -> RunComponents:
    """Start every component concurrently; on any failure stop those that started.

    ``store`` is the run's weight store: the trainer publishes to it, the
    policy replicas load from it. ``policy_version``: the version in
    ``store`` the policy replicas start from (a resumed run's checkpoint);
    None for the model's own weights."""
    c = config
    response_len = c.response_len  # one turn's max_tokens, or a multi-turn trajectory's budget
    starts = {
        "dataloader": DatasetActor.options(procs=1).as_actor(
            path=c.data.path, revision=c.data.revision, data_split=c.data.train_split,
            streaming=c.data.streaming, model=c.model,
        ),
        "policy": Policy.options(
            procs=1, num_replicas=c.policy.num_replicas,
            with_gpus=c.policy.with_gpus, gpu_share=c.policy.gpu_share,
            max_concurrent_requests=c.policy.max_concurrent_requests, router=c.policy.router,
            on_hosts=c.placement.hosts("policy"),
        ).as_service(
            engine_config={"model": c.model, "backend": c.policy.backend, **c.policy.engine},
            sampling_config={
                "n": c.group_size, "max_tokens": c.policy.max_tokens,
                "temperature": c.policy.temperature, "top_p": c.policy.top_p,
            },
            weight_store=store,
            policy_version=policy_version,
        ),
        "trainer": RLTrainer.options(
            procs=c.trainer.procs, with_gpus=c.trainer.with_gpus, gpu_share=c.trainer.gpu_share,
            on_hosts=c.placement.hosts("trainer"),
        ).as_actor(
            model=c.model,
            optimizer={"name": c.trainer.optimizer, "lr": c.trainer.lr, "weight_decay": c.trainer.weight_decay},
            training={
                "local_batch_size": c.trainer.local_batch_size,
                "seq_len": c.data.request_len + response_len,
                "max_norm": c.trainer.max_norm,
                "warmup_steps": c.trainer.warmup_steps,
                "decay_steps": c.steps if c.trainer.lr_decay else None,
                "dtype": c.trainer.dtype,
                "num_threads": c.trainer.num_threads,
            },
            # The variant of c.loss; Dr. GRPO's constant is the longest response allowed.
            loss=functools.partial(policy_loss, beta=c.trainer.beta, constant_length=response_len,
                                   **c.loss.loss_kwargs()),
            weight_store=store,
        ),
        # collate=None: the loop wants the Episodes themselves, to report their
        # rewards and ages; it collates them for the trainer itself.
        "replay_buffer": ReplayBuffer.options(procs=1).as_actor(
            batch_size=c.batch_size, max_policy_age=c.max_policy_age, dp_size=1, collate=None
        ),
        "compute_advantages": ComputeAdvantages.options(procs=1).as_actor(scale=c.loss.scale_rewards),
        "reward_actor": RewardActor.options(
            procs=1, num_replicas=c.reward_actor.num_replicas, on_hosts=c.placement.hosts("reward_actor"),
        ).as_service(
            reward_functions=[REWARD_FUNCTIONS[name]() for name in c.reward_actor.functions]
        ),
    }
    if c.uses_reference:
        starts["ref_model"] = ReferenceModel.options(
            procs=1, num_replicas=c.ref_model.num_replicas,
            with_gpus=c.ref_model.with_gpus, gpu_share=c.ref_model.gpu_share,
            on_hosts=c.placement.hosts("ref_model"),
        ).as_service(model=c.model, dtype=c.ref_model.dtype)
    if c.env.name is not None:
        options = {"tool_cost": c.env.tool_cost} if c.env.name == "calculator" else {}
        starts["env"] = EnvironmentActor.options(procs=1, num_replicas=c.env.num_replicas).as_service(
            env=c.env.name, seed=c.env.seed, max_turns=c.env.max_turns, **options
        )
    if c.eval_samples:
        starts["eval_data"] = DatasetActor.options(procs=1).as_actor(
            path=c.data.path, revision=c.data.revision, data_split=c.data.eval_split,
            streaming=c.data.streaming, model=c.model,
        )
    tasks = {name: asyncio.ensure_future(start) for name, start in starts.items()}
    try:
        await asyncio.gather(*tasks.values())
    except BaseException:
        # One failed (or Ctrl-C): stop the starts still running (a cancelled
        # start stops its own processes), then whatever had already started.
        for task in tasks.values():
            task.cancel()
        await asyncio.wait(tasks.values())
        await shutdown_all(
            [t.result() for t in tasks.values() if not t.cancelled() and t.exception() is None]
        )
        raise
    return RunComponents(**{"ref_model": None, **{name: task.result() for name, task in tasks.items()}})


async def shutdown_all(handles) -> None:
    """Stop actors and services alike (``ForgeActor.shutdown`` takes either).

    One after another: on 2 cores, stopping the seven components of a run
    all at once ran into the stop timeout (``STOP_TIMEOUT_S``), after which
    their processes are killed instead; in turn, each stops cleanly.
    """
    for handle in handles:
        if handle is None:
            continue
        try:
            await ForgeActor.shutdown(handle)
        except Exception as error:
            print(f"warning: a component did not shut down cleanly: {error!r}", file=sys.stderr)
