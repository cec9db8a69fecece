"""EnvironmentActor: environments in their own process, one episode per trajectory.

An environment can be slow or unsafe (a code sandbox, a browser, a game), so
like the reward functions it runs in an actor that scales on its own and can
be a service with replicas. The actor holds one ``Environment`` instance per
open trajectory, keyed by the id the caller gives it::

    env = await EnvironmentActor.options(procs=1, num_replicas=1).as_service(env="calculator")
    problem = await env.sample_problem.route()
    prompt = await env.reset.route("traj-1", problem)
    observation, reward, done, info = await env.step.route("traj-1", "<calc>347 + 589</calc>")

A trajectory's state lives in one replica's process, so with several
replicas every call of a trajectory must go to the same one: make them
inside ``async with env.session():`` (the multi-turn rollout does). The
actor also serves the environment's problems: ``sample_problem()`` for
training, ``eval_problems(count)`` for held-out evaluation.

What the environment returns is checked here, where it enters the kit
(``check_reset``, ``check_step``): a NaN reward or an observation that is
not text is a ValueError naming the environment class and the turn. A
trajectory abandoned before its end is closed by its caller
(``close(episode_id)``); ``open_episodes()`` counts what a process holds.
"""

from __future__ import annotations

from collections import OrderedDict

from monarch.actor import endpoint

from forge_lite.controller import ForgeActor, runtime
from forge_lite.data.math_problems import equation
from forge_lite.envs.base import Environment, StepResult, check_reset, check_step
from forge_lite.envs.calculator import CalculatorEnv
from forge_lite.envs.problems import ProblemStream, big_number_problems, make_big_problem, shipped_problems
from forge_lite.envs.retry import RetryEnv

#: The environments a config can name (``env.name``).
ENVIRONMENTS: dict[str, type[Environment]] = {"calculator": CalculatorEnv, "retry": RetryEnv}

# Trajectories whose caller vanished (a cancelled rollout) are dropped,
# oldest first, beyond this many open ones.
MAX_OPEN_EPISODES = 10_000


def problem_stream(env: str | type[Environment], seed: int) -> ProblemStream:
    """The training problems of environment ``env``: three-digit problems for
    the calculator (drawn fresh, never a test one), the shipped set for retry
    (and for an Environment class of one's own)."""
    if env == "calculator":
        test = {equation(p) for p in big_number_problems("test")}
        return ProblemStream(make=make_big_problem, seed=seed, exclude=test)
    return ProblemStream(shipped_problems("train"), seed=seed)


def test_problems(env: str | type[Environment], count: int | None = None) -> list[dict]:
    """The first ``count`` held-out problems of environment ``env`` (the same every run)."""
    problems = big_number_problems("test") if env == "calculator" else shipped_problems("test")
    return problems[:count]


def make_environment(env: str | type[Environment], **options) -> Environment:
    """A fresh environment ``env`` ("calculator" or "retry", or an Environment
    subclass of one's own) built with ``options`` (``max_turns``, and
    ``tool_cost`` for the calculator).

    Raises ValueError for an unknown name, TypeError for an option it does
    not take or a class that is not an Environment.
    """
    if isinstance(env, type):
        if not issubclass(env, Environment):
            raise TypeError(f"env must be an Environment subclass or a name in {sorted(ENVIRONMENTS)}, got {env!r}")
        return env(**options)
    if env not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {env!r}; the kit ships {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[env](**options)


class EnvironmentActor(ForgeActor):
    """Runs environment ``env`` for many trajectories at once (see the module docstring).

    Parameters
    ----------
    env:
        "calculator" or "retry" (``ENVIRONMENTS``), or an Environment
        subclass importable in the actor's process (from a module, like a
        ForgeActor of one's own); it poses the shipped problems.
    seed:
        Seeds the order of ``sample_problem``; a replica adds its index, so
        replicas pose different problems.
    **options:
        Passed to the environment (``max_turns``, ``tool_cost``).
    """

    def __init__(self, env: str = "calculator", seed: int = 0, **options):
        self.env = env
        self.env_name = env if isinstance(env, str) else env.__name__
        self.seed = seed
        self.options = options

    @endpoint
    async def setup(self) -> None:
        make_environment(self.env, **self.options)  # a bad name or option fails here, as itself
        self.stream = problem_stream(self.env, self.seed + (runtime.replica_index() or 0))
        self.episodes: OrderedDict[str, Environment] = OrderedDict()

    @endpoint
    def sample_problem(self) -> dict:
        """The next training problem, ``{"question", "answer"}``."""
        return self.stream.next()

    @endpoint
    def eval_problems(self, count: int | None = None) -> list[dict]:
        """The first ``count`` held-out problems (all of them if None)."""
        return test_problems(self.env, count)

    @endpoint
    def reset(self, episode_id: str, problem: dict) -> str:
        """Open trajectory ``episode_id`` on ``problem`` (replacing one of that id);
        returns its prompt. Raises ValueError for a problem without ``#### N``
        and for a prompt that is not text (nothing is opened then)."""
        env = make_environment(self.env, **self.options)
        observation = check_reset(env, env.reset(problem))
        self.episodes.pop(episode_id, None)
        self.episodes[episode_id] = env
        while len(self.episodes) > MAX_OPEN_EPISODES:
            self.episodes.popitem(last=False)
        return observation

    @endpoint
    def step(self, episode_id: str, action: str) -> StepResult:
        """Play one model turn of trajectory ``episode_id``; a trajectory that
        is done is closed. Raises KeyError for an id that is not open (never
        reset, already done or closed, or reset on another replica), and
        ValueError, naming the environment class and the turn, for a result
        that breaks the contract (``check_step``: NaN reward, observation not
        text, done not a bool)."""
        env = self._open(episode_id)
        result = check_step(env, env.step(action), getattr(env, "turn", "?"))
        if result.done:
            del self.episodes[episode_id]
        return result

    @endpoint
    def close(self, episode_id: str) -> None:
        """Forget trajectory ``episode_id`` (one abandoned before its end); no error if unknown."""
        self.episodes.pop(episode_id, None)

    @endpoint
    def open_episodes(self) -> int:
        """How many trajectories this process holds: 0 once every one ended or was closed."""
        return len(self.episodes)

    def _open(self, episode_id: str) -> Environment:
        if episode_id not in self.episodes:
            raise KeyError(
                f"no open trajectory {episode_id!r} on this {self.env_name} environment: it was "
                "never reset, it is done or closed, or it was reset on another replica (make every call "
                "of a trajectory inside `async with env.session():`)"
            )
        return self.episodes[episode_id]
