"""Episode and Group: one prompt's rollout, and the rollouts GRPO compares.

An Episode carries everything the trainer needs about one response: the
tokens of the request and the response, the logprobs of the policy that
sampled it (the behaviour policy: the loss's importance ratio is taken
against them), the reference model's logprobs, the reward and, once the
group is scored, the advantage. Its tensors have fixed
lengths so that episodes stack into a batch: the request is padded on the
left (so every request ends at the same column, where the response starts)
and the response on the right.

GRPO samples several responses to the same prompt and scores each against
the group's mean reward; a Group is those episodes, made together.

A multi-turn episode (``forge_lite.grpo.multiturn``) keeps the same shape:
the request is the first prompt, the response everything after it, model
turns and environment turns alternating. ``response_model_mask`` says which
response tokens the model wrote; only those are trained on (``model_mask``
is the collate's ``padding_mask``). A trajectory cut at ``response_len``
says so in ``truncated``; so does a single-turn response that reached
``max_tokens`` (the engine's stop reason "length").
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

# torch is imported inside the methods that build tensors. Episodes also
# live in the light actors' process (the replay buffer's), which only stores
# them, checks their numbers and hands them on: without torch that process
# starts with 0.9 CPU-s less (1.8 -> 0.9, benchmarks/loop_cpu.py prints each
# process's) and holds 190 MB less (360 -> 170 MB measured in a GRPO run);
# tests/test_memory.py checks that it never loads torch.
if TYPE_CHECKING:
    import torch


@dataclass
class Episode:
    """One request, one response, and what the trainer needs to learn from it.

    Created with the request and the padding geometry; the rollout fills in
    ``response``, ``request_tokens``, ``response_tokens``, ``behaviour_logprobs``,
    ``ref_logprobs``, ``reward`` and ``advantage`` as they become known.
    """

    episode_id: str
    request: str
    policy_version: int
    pad_id: int
    request_len: int
    response_len: int
    target: Any = None
    response: str | None = None
    request_tokens: Sequence[int] | torch.Tensor | None = None
    response_tokens: Sequence[int] | torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    # The sampling policy's logprob of each response token (Completion.logprobs;
    # 0.0 on a multi-turn episode's environment tokens, which the loss masks):
    # the loss's importance ratio is the trainer's logprob against these, so
    # an episode sampled by older weights is corrected or clipped. None: the
    # loss treats the episode as on-policy.
    behaviour_logprobs: torch.Tensor | Sequence[float] | None = None
    reward: float | None = None
    advantage: float | None = None
    # KL between the reference and the policy version that sampled the
    # response (mean over its tokens): reported, never trained on.
    behaviour_kl: float | None = None
    # One flag per response token, True where the model wrote it; None means
    # every response token is the model's (a single-turn episode). In a
    # multi-turn episode the environment's tokens are False: the model did not
    # choose them, so they get no gradient and no KL.
    response_model_mask: Sequence[bool] | torch.Tensor | None = None
    # The trajectory did not fit response_len and was cut there.
    truncated: bool = False

    # An episode crosses processes several times (rollout -> advantages ->
    # replay buffer -> collate). Monarch pickles a tensor through torch.save,
    # several times slower than a list of the same numbers, and unpickling
    # one imports torch. So tensor fields travel, and arrive, as lists (every
    # field above takes either; the properties below turn them into tensors).
    def __getstate__(self) -> dict:
        return {name: value.tolist() if hasattr(value, "tolist") else value
                for name, value in self.__dict__.items()}

    @property
    def request_tensor(self) -> torch.Tensor:
        """The request tokens left-padded to ``request_len``: shape ``[request_len]``."""
        import torch

        tokens = self._tokens("request_tokens", self.request_len)
        padding = torch.full((self.request_len - len(tokens),), self.pad_id, dtype=torch.long)
        return torch.cat([padding, tokens])

    @property
    def response_tensor(self) -> torch.Tensor:
        """The response tokens right-padded to ``response_len``: shape ``[response_len]``."""
        import torch

        tokens = self._tokens("response_tokens", self.response_len)
        padding = torch.full((self.response_len - len(tokens),), self.pad_id, dtype=torch.long)
        return torch.cat([tokens, padding])

    @property
    def request_mask(self) -> torch.Tensor:
        """True where ``request_tensor`` holds a real token, False on the left padding."""
        import torch

        real = len(self._tokens("request_tokens", self.request_len))
        return torch.arange(self.request_len) >= self.request_len - real

    @property
    def response_mask(self) -> torch.Tensor:
        """True where ``response_tensor`` holds a real token, False on the right padding.

        Built from the length, not from ``response_tensor != pad_id``: models
        without a pad token pad with EOS, and the EOS a response ends with is
        a real token the policy chose and must be trained on.
        """
        import torch

        real = len(self._tokens("response_tokens", self.response_len))
        return torch.arange(self.response_len) < real

    @property
    def model_mask(self) -> torch.Tensor:
        """True where ``response_tensor`` holds a token the model wrote: shape
        ``[response_len]``, bool. The loss, its KL term and the reported KL
        count these positions only.

        ``response_mask`` itself when ``response_model_mask`` is None; else
        ``response_model_mask`` right-padded with False. Raises ValueError
        when ``response_model_mask`` does not have one flag per response token.

        Example: response tokens ``[5, 6, 7, 8]`` of which 7 came from the
        environment, ``response_model_mask=[True, True, False, True]``, and
        ``response_len=6`` give ``[True, True, False, True, False, False]``.
        """
        import torch

        real = self.response_mask
        if self.response_model_mask is None:
            return real
        flags = torch.as_tensor(self.response_model_mask, dtype=torch.bool).flatten()
        tokens = int(real.sum())
        if len(flags) != tokens:
            raise ValueError(
                f"episode {self.episode_id!r}: {len(flags)} response_model_mask flags for "
                f"{tokens} response_tokens; give one flag per response token"
            )
        return torch.cat([flags, flags.new_zeros(self.response_len - tokens)])

    @property
    def padded_ref_logprobs(self) -> torch.Tensor:
        """``ref_logprobs`` right-padded with zeros to ``response_len`` (float32).

        Needs exactly one logprob per response token: with fewer, the zero
        padding would stand in for the reference's logprobs of real tokens
        and the loss would pull those tokens towards probability 1.
        """
        return self._padded_logprobs(
            "ref_logprobs", "", "pass one logprob per response token "
            "(ReferenceModel.forward with max_req_tokens=<request length>)")

    @property
    def padded_behaviour_logprobs(self) -> torch.Tensor:
        """``behaviour_logprobs`` right-padded with zeros to ``response_len``
        (float32); ValueError without them or without one per response token."""
        return self._padded_logprobs(
            "behaviour_logprobs", " (the Completion's logprobs)",
            "pass the Completion's logprobs, one per generated token")

    def _padded_logprobs(self, name: str, source: str, advice: str) -> torch.Tensor:
        """The per-token logprobs in field ``name``, right-padded with zeros to
        ``response_len`` (float32); ValueError when unset (``source`` says where
        they come from) or not one per response token (``advice`` says what to pass)."""
        import torch

        values = getattr(self, name)
        if values is None:
            raise ValueError(f"episode {self.episode_id!r} has no {name}; set them first{source}")
        logprobs = torch.as_tensor(values, dtype=torch.float32).flatten()
        tokens = len(self._tokens("response_tokens", self.response_len))
        if len(logprobs) != tokens:
            raise ValueError(f"episode {self.episode_id!r}: {len(logprobs)} {name} for {tokens} "
                             f"response_tokens; {advice}")
        return torch.cat([logprobs, logprobs.new_zeros(self.response_len - len(logprobs))])

    def _tokens(self, name: str, max_len: int) -> torch.Tensor:
        import torch

        tokens = getattr(self, name)
        if tokens is None:
            raise ValueError(f"episode {self.episode_id!r} has no {name}; set them first")
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        if len(tokens) > max_len:
            length_name = name.replace("_tokens", "_len")
            raise ValueError(
                f"episode {self.episode_id!r}: {len(tokens)} {name} do not fit "
                f"{length_name}={max_len}; raise {length_name} or shorten the "
                + ("prompt" if name == "request_tokens" else "generation (max_tokens)")
            )
        return tokens


def check_finite(episode: Any) -> None:
    """Raise ValueError if the episode's ``reward``, ``advantage``,
    ``ref_logprobs`` or ``behaviour_logprobs`` holds NaN or +-inf, naming
    the episode and the field.

    One such number is enough to make the loss and every weight NaN. Fields
    that are not set yet (None, or missing on another kind of item) pass.
    """
    episode_id = getattr(episode, "episode_id", type(episode).__name__)
    for name in ("reward", "advantage", "ref_logprobs", "behaviour_logprobs"):
        value = getattr(episode, name, None)
        if value is None:
            continue
        values = _flat_numbers(value)
        bad = [i for i, number in enumerate(values) if not math.isfinite(number)]
        if not bad:
            continue
        if name.endswith("logprobs"):  # a sequence: say where, not all 500 values
            found = f"{name} with non-finite values at (position: value) "
            found += str({i: float(values[i]) for i in bad[:10]})
        else:
            found = f"{name}={value}"
        raise ValueError(
            f"episode {episode_id!r} has {found}; rewards, advantages and logprobs must be "
            "finite, or one NaN makes the loss and every weight NaN"
        )


def _flat_numbers(value: Any) -> list:
    """A number, a (nested) sequence of numbers or a tensor, as a flat list
    (in the replay buffer's process, without torch: see the top of this file)."""
    if hasattr(value, "tolist"):  # a tensor or an array
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [number for item in value for number in _flat_numbers(item)]
    return [value]


@dataclass
class Group:
    """The episodes sampled for one prompt; GRPO normalises rewards within it."""

    group_id: str
    episodes: list[Episode] = field(default_factory=list)

    @classmethod
    def new_group(
        cls,
        group_id: int | str,
        group_size: int,
        request: str,
        policy_version: int,
        pad_id: int,
        request_len: int,
        response_len: int,
        target: Any = None,
    ) -> Group:
        """``group_size`` empty episodes for ``request``, ids ``"<group_id>_<i>"``."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        episodes = [
            Episode(
                episode_id=f"{group_id}_{i}",
                request=request,
                policy_version=policy_version,
                pad_id=pad_id,
                request_len=request_len,
                response_len=response_len,
                target=target,
            )
            for i in range(group_size)
        ]
        return cls(group_id=str(group_id), episodes=episodes)

    @classmethod
    def from_completions(
        cls, completions: Sequence[Any], request: str, target: Any, pad_id: int,
        request_len: int, response_len: int, group_id: str | None = None,
    ) -> Group:
        """A group of one episode per Completion of one ``generate`` call
        (text, tokens, behaviour logprobs and ``truncated`` filled in), at the
        weight version that generated them."""
        group = cls.new_group(
            uuid.uuid4().hex[:8] if group_id is None else group_id, len(completions), request,
            completions[0].generator_version, pad_id, request_len, response_len, target,
        )
        for episode, completion in zip(group.episodes, completions):
            fill_from_completion(episode, completion)
        return group


def fill_from_completion(episode: Episode, completion: Any) -> None:
    """Set what an episode takes from its Completion: the response text, the
    request and response tokens, the sampler's logprobs (``behaviour_logprobs``)
    and ``truncated`` (stop reason "length": the response hit max_tokens)."""
    episode.response = completion.text
    episode.request_tokens = completion.prompt_ids.tolist()
    episode.response_tokens = completion.token_ids.tolist()
    episode.behaviour_logprobs = completion.logprobs
    # getattr: a hand-made completion (a test's, a notebook's) may not say why it stopped.
    episode.truncated = getattr(completion, "stop_reason", None) == "length"


def episode_from_completion(
    sample: dict,
    completion: Any,
    reward: float,
    ref_logprobs: torch.Tensor,
    policy_version: int | None = None,
    pad_id: int = 0,
    request_len: int = 512,
    response_len: int = 512,
    episode_id: str | None = None,
) -> Episode:
    """An Episode from a dataset sample, a Completion, its reward and reference logprobs.

    ``sample`` is what DatasetActor.sample returns (``request``, ``target``);
    ``completion`` is one of Policy.generate's Completions (``text``,
    ``prompt_ids``, ``token_ids``, ``logprobs``, ``stop_reason``,
    ``generator_version``). ``policy_version``
    defaults to the version that generated the completion, which is what
    the replay buffer's age check needs. ``pad_id`` is best the model's
    (``DatasetActor.pad_token``), but any id works: padding is masked by
    length, in attention and in the loss. ``episode_id`` defaults to a
    fresh random id.
    """
    episode = Episode(
        episode_id=uuid.uuid4().hex[:8] if episode_id is None else episode_id,
        request=sample["request"],
        policy_version=(
            completion.generator_version if policy_version is None else policy_version
        ),
        pad_id=pad_id,
        request_len=request_len,
        response_len=response_len,
        target=sample.get("target"),
    )
    fill_from_completion(episode, completion)
    episode.ref_logprobs = ref_logprobs
    episode.reward = reward
    return episode


def create_episode_from_grpo_data(
    sample: dict,
    completion: Any,
    reward: float,
    ref_logprobs: torch.Tensor,
    step: int,
    pad_id: int = 0,
    request_len: int = 512,
    response_len: int = 512,
) -> Episode:
    """The tutorial's name for ``episode_from_completion`` (it never defines it).

    ``step`` is the policy version the loop was at when it generated; the
    lengths default to the tutorial's 512.
    """
    return episode_from_completion(
        sample,
        completion,
        reward,
        ref_logprobs,
        policy_version=step,
        pad_id=pad_id,
        request_len=request_len,
        response_len=response_len,
    )
