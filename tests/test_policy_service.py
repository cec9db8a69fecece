"""The Policy as a 2-replica service on real Monarch processes, with the shipped model:
where a multi-turn conversation's KV cache lives, and what a respawned replica serves.

- The tutorial's sticky-session pattern (`async with policy.session():`, each
  turn = the previous prompt + the reply + a new question) keeps a conversation
  on one replica, so turns 2+ reuse its prefix KV cache; round robin without a
  session moves each turn to the other replica and reuses less.
- The prefix router keeps cache hits high for interleaved conversations
  without any session.
- A killed replica comes back serving the newest published weight version.
- `Completion.replica` is the replica the service says it routed to.

Each engine starts one service for the whole module (vLLM engines take about
20 s each to start). vLLM's CPU prefix cache reuses whole 128-token blocks
only, so every conversation here starts with a prompt longer than 128 tokens.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
from test_engines import perturbed

from forge_lite.actors.policy import Policy
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.controller.service.events import RequestFinished, RequestRouted
from forge_lite.data.prompts import format_request

pytestmark = pytest.mark.timeout(300)

GREEDY = {"temperature": 0.0, "max_tokens": 24}  # the same replies on every replica
TURNS = 3

ENGINE_CONFIGS = {
    "transformers": {"backend": "transformers", "max_model_len": 1024},
    "vllm": {"backend": "vllm", "max_model_len": 1024, "enforce_eager": True},
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(
    scope="module",
    params=[
        "transformers",
        pytest.param(
            "vllm",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
            ],
        ),
    ],
)
async def policy(request, store):
    service = await Policy.options(procs=1, num_replicas=2).as_service(
        engine_config=ENGINE_CONFIGS[request.param], sampling_config=GREEDY, weight_store=store
    )
    yield service
    await service.shutdown()


# ---------------------------------------------------------------- conversations


def first_question(name: str) -> str:
    # The name comes first, so no two conversations share a 128-token block;
    # the digits (one token each) take turn 1 past vLLM's first block.
    numbers = ", ".join(str(10 + (7 * i + len(name)) % 89) for i in range(32))
    return f"Conversation {name}. Remember these numbers: {numbers}. What is 12 + 35?"


def follow_up(tokenizer, prompt: str, reply: str, question: str) -> str:
    """The tutorial's next turn: previous prompt + reply + a new user question."""
    user_turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return prompt + reply + tokenizer.eos_token + "\n" + user_turn


async def converse(policy, tokenizer, name: str, turns: int = TURNS) -> list:
    """One conversation, turn after turn; returns each turn's first Completion."""
    prompt = format_request(tokenizer, first_question(name))
    answers = []
    for turn in range(turns):
        completion = (await policy.generate.route(prompt))[0]
        answers.append(completion)
        prompt = follow_up(tokenizer, prompt, completion.text, f"And what is {turn + 3} + {4 * turn}?")
    return answers


async def interleaved(policy, tokenizer, names: list[str], turns: int = TURNS) -> list[list]:
    """Several conversations at once: turn t of every conversation is in flight together."""
    prompts = [format_request(tokenizer, first_question(name)) for name in names]
    answers: list[list] = [[] for _ in names]
    for turn in range(turns):
        results = await asyncio.gather(*(policy.generate.route(p) for p in prompts))
        for index, result in enumerate(results):
            answers[index].append(result[0])
            prompts[index] = follow_up(tokenizer, prompts[index], result[0].text, f"Then {turn} + {index}?")
    return answers


def cached_fraction(conversations: list[list]) -> float:
    """Of all turn-2+ prompt tokens, the fraction served from the KV cache."""
    later = [c for answers in conversations for c in answers[1:]]
    return sum(c.num_cached_tokens for c in later) / sum(len(c.prompt_ids) for c in later)


# ---------------------------------------------------------------- tests


async def test_a_session_keeps_a_conversation_on_one_replica_and_its_cache(policy, tokenizer):
    async with policy.session():
        pinned = await converse(policy, tokenizer, "alpha")
    assert len(pinned[0].prompt_ids) > 128  # vLLM reuses whole 128-token blocks only
    assert len({c.replica for c in pinned}) == 1
    assert all(c.num_cached_tokens > 0 for c in pinned[1:]), [c.num_cached_tokens for c in pinned]

    # The same conversation (another name, so nothing of it is cached yet)
    # without a session: round robin sends each turn to the other replica.
    moved = await converse(policy, tokenizer, "bravo")
    assert all(a.replica != b.replica for a, b in zip(moved, moved[1:])), [c.replica for c in moved]
    assert moved[1].num_cached_tokens < pinned[1].num_cached_tokens
    assert cached_fraction([moved]) < cached_fraction([pinned])


async def test_the_prefix_router_keeps_interleaved_conversations_cached(policy, tokenizer):
    # An odd number of conversations, so round robin moves each one every turn.
    names = ["charlie", "delta", "echo"]
    round_robin = await interleaved(policy, tokenizer, names)
    policy.set_router("prefix")
    try:
        prefix = await interleaved(policy, tokenizer, [f"{name}-2" for name in names])
    finally:
        policy.set_router("round_robin")
    for answers in prefix:
        assert all(c.num_cached_tokens > 0 for c in answers[1:]), [c.num_cached_tokens for c in answers]
        assert len({c.replica for c in answers}) == 1  # each conversation stayed with its cache
    assert cached_fraction(prefix) > cached_fraction(round_robin)


async def test_completion_replica_is_the_replica_the_service_routed_to(policy):
    routed: dict[int, int] = {}
    answered: list[tuple[int, object]] = []

    def watch(event) -> None:
        if isinstance(event, RequestRouted) and event.endpoint == "generate":
            routed[event.request_id] = event.replica
        elif isinstance(event, RequestFinished) and event.endpoint == "generate" and event.ok:
            answered.append((event.request_id, event.result))

    unsubscribe = policy.events.subscribe(watch)
    try:
        results = await asyncio.gather(*(policy.generate.route(f"Hello {i}", max_tokens=4) for i in range(4)))
    finally:
        unsubscribe()
    by_result = {id(result): request_id for request_id, result in answered}
    replicas = set()
    for result in results:
        replica = routed[by_result[id(result)]]
        assert [c.replica for c in result] == [replica]
        replicas.add(replica)
    assert replicas == {0, 1}  # round robin used both, so the match is not trivial


async def test_a_respawned_replica_serves_the_newest_weights(policy, store):
    # Runs last for its engine: it leaves the service on the new version. The
    # store outlives each engine's service, so the version is one past the newest.
    from transformers import AutoModelForCausalLM

    version = (store.latest() or 0) + 1
    probe = "What is 21 + 21?"
    before = await policy.generate.fanout(probe)
    original = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).state_dict()
    store.put(version, perturbed(original, seed=version))
    await policy.update_weights.fanout(version)
    updated = await policy.generate.fanout(probe)
    assert [r[0].generator_version for r in updated] == [version, version]
    assert updated[1][0].token_ids.tolist() != before[1][0].token_ids.tolist()  # the weights did change

    await policy.kill_replica(1)
    await policy.wait_for_state(1, "HEALTHY", timeout=180)
    assert await policy.get_version.fanout() == [version, version]
    after = await policy.generate.fanout(probe)
    assert after.replicas == [0, 1]
    assert after[1][0].generator_version == version
    # Greedy on the same weights: the fresh replica answers as the one that updated in place.
    assert after[1][0].token_ids.tolist() == updated[1][0].token_ids.tolist()
