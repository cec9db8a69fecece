"""The Policy actor on real Monarch processes: generation, batching of
concurrent requests, weight updates from the weight store, per-replica seeds.

Uses the transformers engine with a tiny random model (fast to start); one
slow test runs the same flow on vLLM.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch
from test_engines import build_tiny_qwen3, perturbed

from forge_lite.actors.policy import Policy


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_qwen3(str(tmp_path_factory.mktemp("tiny_qwen3")))


def engine_config(model: str) -> dict:
    return {"backend": "transformers", "model": model, "max_model_len": 512}


@pytest.fixture(scope="module")
async def policy(tiny_model, store):
    handle = await Policy.options(procs=1).as_actor(
        engine_config=engine_config(tiny_model), sampling_config={"n": 2, "max_tokens": 8},
        weight_store=store,
    )
    yield handle
    await Policy.shutdown(handle)


async def test_generate_returns_n_completions(policy):
    completions = await policy.generate.call_one("What is 2 + 3?")
    assert len(completions) == 2
    for completion in completions:
        assert completion.prompt == "What is 2 + 3?"
        assert 1 <= len(completion.token_ids) <= 8
        assert completion.logprobs.shape == completion.token_ids.shape
        assert completion.replica is None  # a plain actor, not a service replica
    assert len(await policy.generate.call_one("Hi", n=3, max_tokens=4)) == 3


async def test_concurrent_requests_are_answered_and_a_bad_one_fails_alone(policy):
    prompts = [f"question {i}" for i in range(6)]
    results = await asyncio.gather(
        *(policy.generate.call_one(p) for p in prompts),
        policy.generate.call_one("x" * 600),  # longer than max_model_len
        return_exceptions=True,
    )
    for prompt, result in zip(prompts, results):
        assert [c.prompt for c in result] == [prompt, prompt]
    assert isinstance(results[-1], Exception)
    assert "600 tokens" in str(results[-1]) and "512" in str(results[-1])


async def test_an_unknown_sampling_override_is_the_callers_error(policy):
    with pytest.raises(Exception, match="max_token"):
        await policy.generate.call_one("Hi", max_token=4)
    assert len(await policy.generate.call_one("Hi")) == 2  # the actor still serves


async def test_update_weights_serves_the_new_version_and_a_new_policy_starts_where_asked(policy, store, tiny_model):
    from transformers import AutoModelForCausalLM

    greedy = {"n": 1, "max_tokens": 12, "temperature": 0.0}
    before = (await policy.generate.call_one("The weights", **greedy))[0]
    assert await policy.get_version.call_one() == 0

    original = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    store.put(1, perturbed(original))
    await policy.update_weights.call_one(1)
    after = (await policy.generate.call_one("The weights", **greedy))[0]
    assert await policy.get_version.call_one() == 1
    assert after.generator_version == 1
    assert after.token_ids.tolist() != before.token_ids.tolist()

    with pytest.raises(Exception, match=r"version 9.*available: \[1\]"):
        await policy.update_weights.call_one(9)

    # A new Policy on the same store starts from its model (version 0), unless
    # it asks for a stored version.
    fresh = await Policy.options(procs=1).as_actor(engine_config=engine_config(tiny_model), weight_store=store)
    asked = await Policy.options(procs=1).as_actor(
        engine_config=engine_config(tiny_model), weight_store=store, policy_version=1
    )
    try:
        assert await fresh.get_version.call_one() == 0
        again = (await fresh.generate.call_one("The weights", **greedy))[0]
        assert again.token_ids.tolist() == before.token_ids.tolist()
        assert await asked.get_version.call_one() == 1
        again = (await asked.generate.call_one("The weights", **greedy))[0]
        assert again.token_ids.tolist() == after.token_ids.tolist()
    finally:
        await Policy.shutdown(fresh)
        await Policy.shutdown(asked)
    with pytest.raises(KeyError, match=r"version 7.*available: \[1\]"):
        await Policy.options(procs=1).as_actor(
            engine_config=engine_config(tiny_model), weight_store=store, policy_version=7
        )
    # Without weight_store= the Policy gets the kernel's default store
    # (forge_lite.actors.default_store), which does not hold version 1.
    with pytest.raises(KeyError, match=r"version 1 .*available"):
        await Policy.options(procs=1).as_actor(engine_config=engine_config(tiny_model), policy_version=1)


async def test_a_weight_update_among_generations_answers_everyone(policy, store, tiny_model):
    from transformers import AutoModelForCausalLM

    store.put(3, perturbed(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict(), seed=3))
    served_before = await policy.get_version.call_one()
    results = await asyncio.gather(
        *(policy.generate.call_one(f"before {i}") for i in range(4)),
        policy.update_weights.call_one(3),
        *(policy.generate.call_one(f"after {i}") for i in range(4)),
    )
    assert results[4] is None
    completions = [c for answer in results[:4] + results[5:] for c in answer]
    assert len(completions) == 16  # nobody was left waiting or dropped
    # Stamped with the weights it ran on: the old version or the new one.
    assert {c.generator_version for c in completions} <= {served_before, 3}
    assert await policy.get_version.call_one() == 3


@pytest.mark.slow
async def test_service_replicas_are_numbered_and_sample_differently(tiny_model, store):
    service = await Policy.options(procs=1, num_replicas=2).as_service(
        engine_config=engine_config(tiny_model), sampling_config={"max_tokens": 16}
    )
    try:
        answers = await service.generate.fanout("Hello")
        assert [a[0].replica for a in answers] == [0, 1]
        assert answers[0][0].token_ids.tolist() != answers[1][0].token_ids.tolist()
    finally:
        await service.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
async def test_policy_on_vllm_generates_and_updates_weights(tiny_model, store):
    from transformers import AutoModelForCausalLM

    config = {"backend": "vllm", "model": tiny_model, "dtype": "float32", "max_model_len": 512, "enforce_eager": True}
    handle = await Policy.options(procs=1).as_actor(engine_config=config, weight_store=store)
    try:
        greedy = {"max_tokens": 12, "temperature": 0.0}
        before = (await handle.generate.call_one("The weights", **greedy))[0]
        store.put(2, perturbed(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict(), seed=2))
        await handle.update_weights.call_one(2)
        after = (await handle.generate.call_one("The weights", **greedy))[0]
        assert after.generator_version == 2
        assert after.token_ids.tolist() != before.token_ids.tolist()
        assert isinstance(after.logprobs, torch.Tensor) and after.logprobs.shape == after.token_ids.shape
    finally:
        await Policy.shutdown(handle)
