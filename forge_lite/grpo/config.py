"""The settings of a GRPO run: dataclasses with defaults, loaded from YAML.

One ``GRPOConfig`` holds the whole run; each service has its own section, so
``trainer.lr`` or ``policy.num_replicas`` reads like the component it
changes. A YAML file only needs the keys that differ from the defaults, and
the command line changes single values with dotted keys:

    python -m forge_lite.grpo --config configs/grpo_tiny.yaml trainer.lr=1e-4 steps=5

Values are checked against the field types when the config is built, so a
typo fails at once, naming the key and the keys that exist, instead of
minutes later inside an actor (``forge_lite.grpo.config_yaml`` turns the
YAML and the overrides into these dataclasses); the checks that span fields
are ``GRPOConfig.__post_init__``'s.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from forge_lite.actors.optimizer import TrainingConfig
from forge_lite.actors.weight_server import WEIGHT_STORE_KINDS
from forge_lite.controller.actor import host_names
from forge_lite.controller.service.router import ROUTERS
from forge_lite.data.rewards import REWARD_FUNCTIONS
from forge_lite.envs.actor import ENVIRONMENTS
from forge_lite.grpo.config_yaml import apply_override, build, read_yaml  # noqa: F401  (apply_override: as before)
from forge_lite.rl.loss import DEFAULT_BETA, LOSS_TYPES, VARIANTS, variant_settings

#: The reward functions a config can name.
REWARD_FUNCTION_NAMES = tuple(REWARD_FUNCTIONS)
#: The environments a config can name (``env.name``).
ENVIRONMENT_NAMES = tuple(ENVIRONMENTS)
#: The components a config's ``placement`` section can put on named hosts.
PLACED_COMPONENTS = ("policy", "ref_model", "reward_actor", "trainer")
#: Keys renamed so that the config says what the run's handles say
#: (``s.ref_model``, ``s.reward_actor``, the tutorial's names): old -> new, as
#: sections and as ``placement`` keys. A file, an override or a checkpoint
#: written with an old key still loads, with a warning (``GRPOConfig.from_dict``).
RENAMED_KEYS = {"reference": "ref_model", "reward": "reward_actor"}


@dataclass
class DataConfig:
    """Where the problems come from (the shipped math set when ``path`` is None)."""

    path: str | None = None  # e.g. "openai/gsm8k"
    revision: str | None = None  # gsm8k's configuration: "main" or "socratic"
    train_split: str = "train"
    eval_split: str = "test"
    streaming: bool = False
    # Prompts are left-padded to this many tokens so episodes stack into a batch;
    # a longer prompt is an error that names this setting.
    request_len: int = 128


@dataclass
class PolicyConfig:
    """The generating service: its replicas, engine and sampling."""

    num_replicas: int = 1
    with_gpus: bool = False
    # With with_gpus: the share of one GPU each replica takes (1.0: a GPU of
    # its own). Below 1, keep the engine to it too (engine.gpu_memory_utilization).
    gpu_share: float = 1.0
    backend: str = "auto"  # "auto" (vLLM if it imports), "vllm" or "transformers"
    max_tokens: int = 64  # also each episode's response_len
    temperature: float = 1.0
    top_p: float = 1.0
    # Requests one replica takes at once; the Policy batches what is queued,
    # so this bounds the generation batch (the held-out evaluation sends all
    # its prompts together).
    max_concurrent_requests: int = 64
    engine: dict = field(default_factory=dict)  # more engine_config keys, e.g. max_model_len
    # Which replica takes each request: "round_robin", "least_loaded" or
    # "prefix" (ServiceConfig.router). Multi-turn runs with env.sessions pin
    # each trajectory to one replica whatever the router says.
    router: str = "round_robin"


@dataclass
class TrainerConfig:
    """The trainer actor: optimizer, loss and batching.

    ``max_norm``, ``local_batch_size``, ``warmup_steps`` and ``dtype`` become
    the RLTrainer's ``training`` options (``forge_lite.actors.optimizer.TrainingConfig``,
    which owns their meaning and defaults); the run adds ``seq_len`` and,
    with ``lr_decay``, ``decay_steps``.
    """

    lr: float = 1e-5
    optimizer: str = "AdamW"  # any torch.optim class
    weight_decay: float = 0.0
    beta: float = DEFAULT_BETA  # weight of the KL term that holds the policy near the reference
    max_norm: float = TrainingConfig.max_norm  # gradient clip
    local_batch_size: int | None = TrainingConfig.local_batch_size  # micro-batch size; None: whole batch
    warmup_steps: int = TrainingConfig.warmup_steps  # steps of linear learning-rate warm-up
    lr_decay: bool = False  # after the warm-up, fall linearly to 0 by the last step
    dtype: str = TrainingConfig.dtype
    num_threads: int | None = TrainingConfig.num_threads  # the trainer's; None: threads_per_process
    with_gpus: bool = False
    gpu_share: float = 1.0  # with with_gpus: the share of one GPU each process takes
    # Data-parallel processes (DDP; one GPU each with with_gpus). Each step's
    # batch is split evenly over them, so batch_size must divide by procs.
    procs: int = 1


@dataclass
class LossConfig:
    """Which policy loss the trainer applies (``forge_lite.rl.loss``), and its knobs.

    ``type``: ``grpo`` | ``dapo`` | ``dr_grpo`` | ``gspo`` | ``cispo`` | ``sapo``.
    A knob left null takes the variant's value from its paper
    (``forge_lite.rl.loss.VARIANTS``, with the sources); the run's config
    holds the values it resolved to.

    ============  ========  =========  =============  ========  =========
    type          clip_low  clip_high  aggregation    rewards   drops
    ============  ========  =========  =============  ========  =========
    grpo          0.2       0.2        seq. mean      / std     nothing
    dapo          0.2       0.28       token mean     / std     equal groups, truncated
    dr_grpo       0.2       0.2        constant len.  no std    nothing
    gspo          3e-4      4e-4       seq. mean      / std     nothing
    cispo         none      4.0        token mean     / std     nothing
    sapo          (a gate)  (a gate)   seq. mean      / std     nothing
    ============  ========  =========  =============  ========  =========

    GSPO's bounds apply to a ratio per sequence; CISPO caps the weight at
    1 + clip_high (5.0) and sets no lower bound (clip_low null); SAPO has no
    clip, its gate's temperatures are ``sapo_temperature_pos/neg``.
    ``skip_uniform_groups`` (the run's, DAPO's "dynamic sampling") also
    defaults to the variant's when null. A saved config (a checkpoint's)
    holds the resolved values: to resume under another ``loss.type``, give
    its knobs as well, or they stay the first variant's.
    """

    type: str = "grpo"
    # The ratio's clip range [1 - clip_low, 1 + clip_high]; null: the variant's.
    # TRL: GRPOConfig.epsilon (0.2) and epsilon_high (DAPO's 0.28).
    clip_low: float | None = None
    clip_high: float | None = None
    # "sequence_mean", "token_mean" or "constant_length" (see forge_lite.rl.loss.aggregate).
    aggregation: str | None = None
    # Advantages (r - mean) / std ("group") or r - mean ("none", Dr. GRPO);
    # TRL's scale_rewards.
    scale_rewards: str | None = None
    # Leave responses cut at max_tokens out of the loss (DAPO's overlong
    # filtering; TRL's mask_truncated_completions, default false).
    mask_truncated: bool | None = None
    # SAPO's gate temperatures for positive and other advantages (the paper's,
    # and TRL's sapo_temperature_pos/neg defaults).
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def loss_kwargs(self) -> dict:
        """The keyword arguments of ``forge_lite.rl.loss.policy_loss`` for this section."""
        return dict(
            loss_type=self.type, clip_low=self.clip_low, clip_high=self.clip_high,
            aggregation=self.aggregation, sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
        )


@dataclass
class ReferenceConfig:
    """The frozen reference model, a service (TorchForge's GRPO app makes it one too)."""

    num_replicas: int = 1
    with_gpus: bool = False
    gpu_share: float = 1.0  # with with_gpus: the share of one GPU each replica takes
    dtype: str = "float32"
    # Responses of each group the reference model scores. The KL penalty
    # (trainer.beta > 0) needs every one: None. With beta 0 the reference
    # logprobs only feed the reported KL, and one response per group
    # estimates it for 1/group_size of the work (benchmarks/grpo.py's phase
    # split shows the reference's share of a step). 0 (beta 0 only): no
    # reference model at all, and no KL reported; one model process fewer
    # to start and to feed (TRL's GRPOTrainer loads none when beta is 0).
    kl_samples: int | None = None


@dataclass
class RewardConfig:
    """The reward service; the episode's reward is the mean of ``functions``."""

    functions: list = field(default_factory=lambda: ["math", "thinking"])
    num_replicas: int = 1


@dataclass
class EnvConfig:
    """A multi-turn environment (``forge_lite.envs``); ``name`` None is single-turn GRPO.

    With a name, each rollout plays ``group_size`` trajectories of the
    environment (``forge_lite.grpo.multiturn``): the problems, the prompts
    and the rewards are the environment's (``data`` and ``reward_actor`` are not
    used for them), ``policy.max_tokens`` bounds each model turn and
    ``response_len`` the whole trajectory after the prompt.
    """

    name: str | None = None  # "calculator" or "retry"
    max_turns: int = 3  # model turns before the environment ends the episode
    # Tokens after the prompt, the model's and the environment's together: every
    # episode's response_len. A trajectory that would be longer is cut here and
    # marked truncated.
    response_len: int = 128
    tool_cost: float = 0.0  # calculator: reward taken per tool call
    # Every turn of a trajectory in one policy session, on the replica whose KV
    # cache holds the conversation so far; false: policy.router picks each turn.
    sessions: bool = True
    num_replicas: int = 1  # environment service replicas
    seed: int = 0  # the order of the environment's training problems


@dataclass
class PlacementConfig:
    """Which hosts of the attached cluster (``forge_lite.attach_cluster``) run
    each component: a host name (``host1``), an index (``1``), or a list of
    them. null, the default, lets the kit spread the component over the
    cluster, least-occupied host first (on one machine there is nothing to
    choose). A service's replicas go to the least occupied of its hosts, and a
    replica whose host is lost runs elsewhere until the host is back
    (``options(on_hosts=...)``). The names are checked against the cluster
    when the run starts, before any process does.

    The components not listed here (the dataset, the replay buffer, the
    advantages, the weight server of ``weights: actor``) are spread by the kit.
    """

    policy: str | int | list | None = None
    ref_model: str | int | list | None = None
    reward_actor: str | int | list | None = None
    trainer: str | int | list | None = None

    def hosts(self, component: str) -> tuple | None:
        """The hosts named for ``component`` as a tuple (None: the kit spreads it)."""
        names = getattr(self, component)
        return None if names is None else host_names(names)


@dataclass
class GRPOConfig:
    """A whole GRPO run. ``model`` None is the shipped model."""

    model: str | None = None
    steps: int = 50  # training steps (optimizer steps, one weight version each)
    group_size: int = 4  # responses per prompt; GRPO compares them with each other
    batch_size: int = 16  # episodes per training step
    # Episodes generated more than this many versions before the trainer's
    # current one are dropped unused; 0 is strictly on-policy.
    max_policy_age: int = 1
    # How many batches the rollouts may put in the buffer before the trainer
    # takes them: a new round of groups starts while the buffer holds fewer
    # untaken episodes than batches_ahead * batch_size. 1 keeps generation
    # one step ahead of training; 2 lets the policy start the next round
    # while the trainer still holds the last one, so neither waits for the
    # other as often (benchmarks/loop_cpu.py, batches_ahead=1 against 2,
    # prints both runs' steps/min and groups started per step). Episodes
    # older than max_policy_age are dropped unused either way.
    batches_ahead: int = 2
    num_rollout_tasks: int = 2  # concurrent rollout loops
    # Groups each rollout loop keeps in flight at once: their generate calls
    # reach the policy together, so an idle replica prefills them together,
    # and the engine decodes every request in flight in one batch (both
    # engines batch continuously). Prompts in flight: num_rollout_tasks
    # times this.
    prompts_per_rollout: int = 1
    # Leave out of the buffer a group whose responses all got the same reward:
    # its advantages are all 0, so with beta = 0 it teaches nothing (with
    # beta > 0 only the KL term), and it takes batch slots from groups that do.
    # null: what loss.type does (true for dapo, DAPO's dynamic sampling; else false).
    skip_uniform_groups: bool | None = None
    eval_samples: int = 100  # held-out problems scored greedily before and after; 0: none
    output_dir: str | None = None  # None: a fresh directory under the system's temp dir
    # Save a checkpoint every this many steps, under <output_dir>/checkpoints/,
    # keeping the last two; None: never. A run resumes from one with
    # resume=<output_dir> (forge_lite.grpo.checkpoint says what it holds).
    checkpoint_every: int | None = None
    progress: bool | None = None  # tqdm bar; None: only when stderr is a terminal
    # torch's CPU threads in each actor process (OMP_NUM_THREADS); None: torch's
    # default, one per core. A run has about eight processes, and on a few
    # cores their threads spin-wait for cores the others hold: on 2 cores,
    # 1 thread per process made a step several times faster than the default.
    threads_per_process: int | None = 1
    # How the trainer's weights reach the policy replicas: "files" (a folder
    # every process reads; one host), "actor" (versions in the trainer's
    # memory, fetched as Monarch messages once per host; any host) or "auto"
    # (the actor when the cluster has more than one host, else files). See
    # forge_lite.actors.weight_server.
    weights: str = "auto"
    # Where the run's metrics also go: "none", or "tensorboard" (event files
    # in <output_dir>/tensorboard/, offline; the optional extra
    # pip install -e '.[tracking]'; see forge_lite.grpo.tracking).
    tracking: str = "none"
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ref_model: ReferenceConfig = field(default_factory=ReferenceConfig)  # the service s.ref_model
    reward_actor: RewardConfig = field(default_factory=RewardConfig)  # the service s.reward_actor
    env: EnvConfig = field(default_factory=EnvConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    @property
    def uses_reference(self) -> bool:
        """Whether the run starts a reference model (not with ``ref_model.kl_samples: 0``)."""
        return self.ref_model.kl_samples != 0

    @property
    def response_len(self) -> int:
        """Every episode's response length: ``policy.max_tokens`` (one turn),
        or ``env.response_len`` (a multi-turn trajectory) with an environment."""
        return self.policy.max_tokens if self.env.name is None else self.env.response_len

    def __post_init__(self) -> None:
        for name, least in (
            ("steps", 1),
            ("group_size", 2),
            ("batch_size", 1),
            ("max_policy_age", 0),
            ("batches_ahead", 1),
            ("num_rollout_tasks", 1),
            ("prompts_per_rollout", 1),
            ("eval_samples", 0),
            ("policy.num_replicas", 1),
            ("policy.max_tokens", 1),
            ("policy.max_concurrent_requests", 1),
            ("ref_model.num_replicas", 1),
            ("reward_actor.num_replicas", 1),
            ("data.request_len", 1),
            ("threads_per_process", 1),
            ("trainer.procs", 1),
            ("trainer.warmup_steps", 0),
            ("ref_model.kl_samples", 0),
            ("checkpoint_every", 1),
            ("env.max_turns", 1),
            ("env.response_len", 2),
            ("env.num_replicas", 1),
        ):
            value = _get(self, name)
            if value is None:  # threads_per_process: torch's default; kl_samples: every response
                continue
            if value < least:
                why = (
                    " (GRPO scores each response against its group: the advantage of a "
                    "group of one is undefined)"
                    if name == "group_size"
                    else ""
                )
                raise ValueError(f"{name} must be >= {least}, got {value}{why}")
        self._resolve_loss()
        if self.tracking not in ("none", "tensorboard"):
            raise ValueError(f"tracking must be 'none' or 'tensorboard', got {self.tracking!r}")
        if self.weights not in WEIGHT_STORE_KINDS:
            raise ValueError(f"weights must be one of {list(WEIGHT_STORE_KINDS)}, got {self.weights!r}")
        if self.ref_model.kl_samples is not None and self.trainer.beta:
            raise ValueError(
                f"ref_model.kl_samples={self.ref_model.kl_samples} needs trainer.beta: 0 (it is "
                f"{self.trainer.beta}): the KL penalty needs every response's reference logprobs"
            )
        if self.batch_size % self.trainer.procs:
            raise ValueError(
                f"batch_size ({self.batch_size}) must divide evenly over trainer.procs "
                f"({self.trainer.procs}): each data-parallel process trains on an equal share"
            )
        if self.env.name is not None and self.env.name not in ENVIRONMENT_NAMES:
            raise ValueError(f"env.name must be one of {list(ENVIRONMENT_NAMES)} or null, got {self.env.name!r}")
        if self.env.tool_cost < 0:
            raise ValueError(f"env.tool_cost must be >= 0 (a reward taken per call), got {self.env.tool_cost}")
        if self.policy.router not in ROUTERS:
            raise ValueError(f"policy.router must be one of {sorted(ROUTERS)}, got {self.policy.router!r}")
        for component in PLACED_COMPONENTS:
            value = getattr(self.placement, component)
            if value is not None:
                try:
                    host_names(value)  # the check options(on_hosts=...) makes
                except ValueError as error:
                    raise ValueError(f"placement.{component}: {error}") from None
        unknown = [f for f in self.reward_actor.functions if f not in REWARD_FUNCTION_NAMES]
        if unknown or not self.reward_actor.functions:
            raise ValueError(
                f"reward_actor.functions must name one or more of {list(REWARD_FUNCTION_NAMES)}, "
                f"got {self.reward_actor.functions}"
            )

    def _resolve_loss(self) -> None:
        """Fill the null knobs of ``loss`` (and ``skip_uniform_groups``) with
        the variant's values; a ValueError names a bad one."""
        if self.loss.type not in LOSS_TYPES:
            raise ValueError(f"loss.type must be one of {list(LOSS_TYPES)}, got {self.loss.type!r}")
        try:
            settings = variant_settings(
                self.loss.type, clip_low=self.loss.clip_low, clip_high=self.loss.clip_high,
                aggregation=self.loss.aggregation, scale_rewards=self.loss.scale_rewards,
                mask_truncated=self.loss.mask_truncated,
            )
        except ValueError as error:
            raise ValueError(f"loss: {error}") from None
        for name in ("clip_low", "clip_high", "aggregation", "scale_rewards", "mask_truncated"):
            setattr(self.loss, name, settings[name])
        if self.skip_uniform_groups is None:
            self.skip_uniform_groups = VARIANTS[self.loss.type]["skip_uniform_groups"]
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self.loss, name) > 0:
                raise ValueError(f"loss.{name} must be > 0, got {getattr(self.loss, name)}")

    @classmethod
    def from_dict(cls, values: dict | None) -> GRPOConfig:
        """Build from nested dicts (a parsed YAML file); missing keys keep their defaults.

        An old key of ``RENAMED_KEYS`` (``reference``, ``reward``) is read as
        its new name with a FutureWarning; any other unknown key is a
        ValueError naming it."""
        return build(cls, _renamed(values or {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = ()
) -> GRPOConfig:
    """The config in the YAML file ``path`` (defaults if None), with ``overrides``
    such as ``["trainer.lr=1e-4", "steps=5"]`` applied on top.

    A file may start from another: ``base: grpo_tiny.yaml`` (a path relative
    to the file) reads that one first, and this file's keys replace its keys,
    section by section. Raises ValueError for a file that is not a mapping or
    a ``base`` chain that loops, FileNotFoundError for a missing file."""
    values = read_yaml(path) if path is not None else {}
    for override in overrides:
        apply_override(values, override)
    return GRPOConfig.from_dict(values)

def _renamed(values: dict, where: str = "") -> dict:
    """``values`` with each old key of ``RENAMED_KEYS`` under its new name, in
    ``placement`` too, warning once per key. Given both names, the one later in
    ``values`` wins, key by key: an override's over its file's, as for any key."""
    if not isinstance(values, dict):
        return values  # build names what is wrong with it
    renamed: dict = {}
    for key, value in values.items():
        if key == "placement" and not where:
            value = _renamed(value, "placement.")
        new = RENAMED_KEYS.get(key, key)
        if new != key:
            # FutureWarning, not DeprecationWarning: Python shows it by default.
            warnings.warn(
                f"config key {where}{key} is now {where}{new} (the run's s.{new}); "
                f"read as {where}{new}: rename it in your YAML or override",
                FutureWarning, stacklevel=3,
            )
        if isinstance(renamed.get(new), dict) and isinstance(value, dict):
            value = {**renamed[new], **value}
        renamed[new] = value
    return renamed


def _get(config: GRPOConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
