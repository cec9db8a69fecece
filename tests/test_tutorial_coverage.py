"""Every call of the tutorial's Part 2 runs in a notebook, in the section that teaches it.

The tutorial (TorchForge's *Zero to Forge*, Part 2) is the specification of the kit's API, and
the notebooks promise to run each of its code blocks for real. The list below
maps each block's calls, as the notebook writes them (the kit's imports, and
the corrected call where the tutorial is wrong: see docs/tutorial_differences.md),
to the notebook and the ``## `` section whose code cells run them.
A call that drifts out of its section, or a cell that was never executed in
the committed notebook, fails here. A notebook that does not exist yet is
skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

S02 = "02_services.ipynb"

# (tutorial code block, call as the notebook writes it, notebook, section heading)
TUTORIAL_CALLS = [
    # 1. Real Service Configuration
    ("service configuration", "Policy.options(", S02, "## 2. Configuring a service"),
    ("service configuration", "num_replicas=4,  # number of replicas", S02, "## 2. Configuring a service"),
    # 2. Real Service Creation
    ("service creation", ").as_service(", S02, "## 3. Starting a service"),
    ("service creation", "engine_config={", S02, "## 3. Starting a service"),
    ("service creation", "sampling_config={", S02, "## 3. Starting a service"),
    ("service creation", 'prompt = "What is 3 + 5?"', S02, "## 3. Starting a service"),
    ("service creation", "responses = await policy.generate.route(prompt)", S02, "## 3. Starting a service"),
    ("service creation", 'print(f"Response: {responses[0].text}")', S02, "## 3. Starting a service"),
    ("service creation", "policy.shutdown()", S02, "## Teardown"),
    # 3. How Services Actually Work
    ("how services work", "responses = await policy.generate.route(prompt=prompt)", S02, "## 4. How a call reaches a replica"),
    # Deep dive: .route()
    ("route", "responses = await policy.generate.route(prompt=question)", S02, "## 5. The adverbs"),
    ("route", "answer = responses[0].text", S02, "## 5. The adverbs"),
    ("route", "await policy.generate.route(prompt=42)", S02, "## 5. The adverbs"),  # docs/tutorial_differences.md#route-retries
    # Deep dive: .fanout()
    ("fanout", "current_versions = await policy.get_version.fanout()", S02, "## 5. The adverbs"),
    ("fanout", "await policy.update_weights.fanout(", S02, "## 9. Weight synchronisation"),
    # The API summary (a list, not a code block): call_one is for actors; on a service it says what to use
    ("adverbs summary", "await policy.generate.call_one(", S02, "## 5. The adverbs"),
    # Streaming operations (docs/tutorial_differences.md#train-step-args: train_step takes inputs, targets)
    ("streaming", "batch = await replay_buffer.sample.call_one(curr_policy_version=step)", S02, "## 9. Weight synchronisation"),
    ("streaming", "loss = await trainer.train_step.call_one(inputs, targets)", S02, "## 9. Weight synchronisation"),
    ("streaming", "await asyncio.sleep(0.1)", S02, "## 9. Weight synchronisation"),
    # Sessions: the counter without sessions (docs/tutorial_differences.md#counter-values)
    ("counter", "class ForgeCounter(ForgeActor):", S02, "## 6. Sticky sessions"),
    ("counter", "ForgeCounter.options(procs=1, num_replicas=4).as_service(initial_value=0)", S02, "## 6. Sticky sessions"),
    ("counter", "await counter_service.increment.route()", S02, "## 6. Sticky sessions"),
    ("counter", "results = await counter_service.increment.fanout()", S02, "## 6. Sticky sessions"),
    # Sessions: the counter with a session
    ("counter session", "async with counter_service.session():", S02, "## 6. Sticky sessions"),
    ("counter session", "await counter_service.reset.route()", S02, "## 6. Sticky sessions"),
    ("counter session", "final_value = await counter_service.get_value.route()", S02, "## 6. Sticky sessions"),
    ("counter session", "await counter_service.shutdown()", S02, "## 6. Sticky sessions"),
    # The KV cache problem: naive (docs/tutorial_differences.md#choose-on-service) and with sessions
    ("kv cache naive", "await policy_service.generate.choose(question1)", S02, "## 7. The KV-cache problem"),
    ("kv cache session", "async with policy.session():", S02, "## 7. The KV-cache problem"),
    ("kv cache session", "await policy.generate.route(prompt", S02, "## 7. The KV-cache problem"),
    # Replay buffer consistency
    ("replay buffer", "ReplayBuffer.options(procs=1).as_actor(batch_size=2, max_policy_age=1, dp_size=1)", S02, "## 8. Replay buffer consistency"),
    ("replay buffer", "replay_buffer.add.call_one(episode)", S02, "## 8. Replay buffer consistency"),
    ("replay buffer", "batch = await replay_buffer.sample.call_one(", S02, "## 8. Replay buffer consistency"),
    ("replay buffer", "batch_size=None", S02, "## 8. Replay buffer consistency"),
    ("replay buffer", "await replay_buffer.clear.call_one()", S02, "## 8. Replay buffer consistency"),
    ("replay buffer", "await replay_buffer.evict.call_one(", S02, "## 8. Replay buffer consistency"),
    ("replay buffer", "await replay_buffer.state_dict.call_one()", S02, "## 8. Replay buffer consistency"),
    # Weight synchronisation
    ("weight sync", "async def real_weight_sync(trainer, policy, step):", S02, "## 9. Weight synchronisation"),
    ("weight sync", "await trainer.push_weights.call_one(policy_version=step + 1)", S02, "## 9. Weight synchronisation"),
    ("weight sync", "await policy.update_weights.fanout(policy_version=step + 1)", S02, "## 9. Weight synchronisation"),
    ("weight sync", "current_version = await policy.get_version.route()", S02, "## 9. Weight synchronisation"),
    # simple_rl_step, defined in section 10, run once everything is up (each fix cited at its call)
    ("simple rl step", "async def simple_rl_step():", S02, "## 10. Asynchronous coordination"),
    ("simple rl step", "sample = await dataloader.sample.call_one()", S02, "## 10. Asynchronous coordination"),
    ("simple rl step", 'prompt, target = sample["request"], sample["target"]', S02, "## 10. Asynchronous coordination"),
    ("simple rl step", "await policy.generate.route(prompt=prompt", S02, "## 10. Asynchronous coordination"),
    ("simple rl step", "input_ids = torch.cat([action.prompt_ids, action.token_ids])", S02, "## 10. Asynchronous coordination"),
    ("simple rl step", "await ref_model.forward.route(", S02, "## 10. Asynchronous coordination"),  # docs/tutorial_differences.md#reference-model-service
    ("simple rl step", "max_req_tokens=len(action.prompt_ids), return_logprobs=True", S02, "## 10. Asynchronous coordination"),  # docs/tutorial_differences.md#max-req-tokens
    ("simple rl step", "await reward_actor.evaluate_response.route(", S02, "## 10. Asynchronous coordination"),
    ("simple rl step", "episode = Episode(", S02, "## 10. Asynchronous coordination"),
    ("simple rl step", "Group.new_group(", S02, "## 10. Asynchronous coordination"),  # docs/tutorial_differences.md#group-of-one
    ("simple rl step", "await compute_advantages.compute.call_one(group)", S02, "## 10. Asynchronous coordination"),
    ("simple rl step", "inputs, targets = batch", S02, "## 10. Asynchronous coordination"),
    ("simple rl step", "await trainer.train_step.call_one(inputs, targets)", S02, "## 10. Asynchronous coordination"),  # docs/tutorial_differences.md#call-returns-mesh
    ("simple rl step", "loss = await simple_rl_step()", S02, "## 13. The whole orchestration"),  # docs/tutorial_differences.md#zero-loss
    # Handling speed mismatches with service scaling
    ("scaling", "Policy.options(procs=1, num_replicas=8, with_gpus=True)", S02, "## 11. Speed mismatches"),
    ("scaling", "RewardActor.options(procs=1, num_replicas=16, with_gpus=False)", S02, "## 11. Speed mismatches"),
    ("scaling", "RLTrainer.options(procs=1, with_gpus=True)", S02, "## 11. Speed mismatches"),
    ("scaling", "reward_actor = await RewardActor.options(", S02, "## 11. Speed mismatches"),
    ("scaling", "await reward_actor.scale(", S02, "## 11. Speed mismatches"),
    ("scaling", 'optimizer={"name": "AdamW", "lr": 1e-5}', S02, "## 9. Weight synchronisation"),
    # Service implementation example: the tutorial's RewardActor (docs/tutorial_differences.md#reward-score)
    ("reward actor", "class RewardActor(ForgeActor):", S02, "## 12. A reward service"),
    ("reward actor", "async def evaluate_response(self, prompt: str, response: str, target: str) -> float:", S02, "## 12. A reward service"),
    ("reward actor", "reward_functions=[MathReward(), ThinkingReward()]", S02, "## 12. A reward service"),
    ("reward actor", "score = await reward_actor.evaluate_response.route(prompt=prompt, response=response, target=target)", S02, "## 12. A reward service"),
    ("reward actor", "await reward_actor.shutdown()", S02, "## 12. A reward service"),
    # Service orchestration: the training loop (each fix cited at its call)
    ("orchestration", "= await asyncio.gather(", S02, "## 13. The whole orchestration"),
    ("orchestration", "DatasetActor.options(procs=1).as_actor(", S02, "## 13. The whole orchestration"),
    ("orchestration", "Policy.options(procs=1, with_gpus=WITH_GPUS, num_replicas=1).as_service(", S02, "## 13. The whole orchestration"),
    ("orchestration", "RLTrainer.options(procs=1, with_gpus=WITH_GPUS).as_actor(", S02, "## 13. The whole orchestration"),  # docs/tutorial_differences.md#default-loss
    ("orchestration", "ReplayBuffer.options(procs=1).as_actor(batch_size=2, max_policy_age=1, dp_size=1)", S02, "## 13. The whole orchestration"),  # docs/tutorial_differences.md#buffer-collate
    ("orchestration", "ComputeAdvantages.options(procs=1).as_actor()", S02, "## 13. The whole orchestration"),
    ("orchestration", "ReferenceModel.options(procs=1, with_gpus=WITH_GPUS, num_replicas=1).as_service(", S02, "## 13. The whole orchestration"),  # docs/tutorial_differences.md#reference-model-service
    ("orchestration", "RewardActor.options(procs=1, num_replicas=1).as_service(", S02, "## 13. The whole orchestration"),
    ("orchestration", "async def production_training_loop(", S02, "## 13. The whole orchestration"),
    ("orchestration", 'responses = await policy.generate.route(sample["request"])', S02, "## 13. The whole orchestration"),
    ("orchestration", 'target=sample["target"]', S02, "## 13. The whole orchestration"),  # docs/tutorial_differences.md#reward-target
    ("orchestration", "create_episode_from_grpo_data(", S02, "## 13. The whole orchestration"),  # docs/tutorial_differences.md#episode-helper
    ("orchestration", "await replay_buffer.add.call_one(episode)", S02, "## 13. The whole orchestration"),  # docs/tutorial_differences.md#advantages-before-add
    ("orchestration", "batch = await replay_buffer.sample.call_one(curr_policy_version=step)", S02, "## 13. The whole orchestration"),
    ("orchestration", "await trainer.push_weights.call_one(step + 1)", S02, "## 13. The whole orchestration"),  # docs/tutorial_differences.md#call-returns-mesh
    ("orchestration", "await policy.update_weights.fanout(step + 1)", S02, "## 13. The whole orchestration"),
    ("orchestration", "DatasetActor.shutdown(dataloader)", S02, "## 13. The whole orchestration"),
    ("orchestration", "RLTrainer.shutdown(trainer)", S02, "## 13. The whole orchestration"),
    ("orchestration", "ReplayBuffer.shutdown(replay_buffer)", S02, "## 13. The whole orchestration"),
    ("orchestration", "ComputeAdvantages.shutdown(compute_advantages)", S02, "## 13. The whole orchestration"),
    ("orchestration", "ReferenceModel.shutdown(ref_model)", S02, "## 13. The whole orchestration"),
    ("orchestration", "reward_actor.shutdown()", S02, "## 13. The whole orchestration"),
]

# The code blocks of the tutorial's Part 2 in order (plus its API summary); each needs an entry above.
TUTORIAL_BLOCKS = [
    "service configuration", "service creation", "how services work", "adverbs summary", "route", "fanout",
    "streaming", "counter", "counter session", "kv cache naive", "kv cache session",
    "replay buffer", "weight sync", "simple rl step", "scaling", "reward actor", "orchestration",
]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cells_by_section(path: Path) -> dict[str, list[dict]]:
    """The code cells under each level-2 markdown heading, keyed by the heading line."""
    sections: dict[str, list[dict]] = {}
    current = None
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            headings = [line for line in _source(cell).splitlines() if line.startswith("## ")]
            if headings:
                current = headings[-1]
                sections.setdefault(current, [])
        elif cell["cell_type"] == "code" and current is not None:
            sections[current].append(cell)
    return sections


@pytest.mark.parametrize(
    "block, call, notebook, section",
    TUTORIAL_CALLS,
    ids=[f"{nb}:{section.split('.')[0].lstrip('# ')}:{call[:48]}" for _, call, nb, section in TUTORIAL_CALLS],
)
def test_tutorial_call_runs_in_its_section(block, call, notebook, section):
    path = NOTEBOOKS / notebook
    if not path.exists():
        pytest.skip(f"{notebook} is not written yet")
    sections = code_cells_by_section(path)
    matching = [heading for heading in sections if heading.startswith(section)]
    assert matching, f"{notebook} has no section {section!r}; its sections: {list(sections)}"
    cells = [cell for cell in sections[matching[0]] if call in _source(cell)]
    assert cells, f"the tutorial's {block!r} call {call!r} is in no code cell of {notebook} {section!r}"
    assert any(cell.get("execution_count") is not None for cell in cells), (
        f"{notebook}: the cell with {call!r} was never executed in the committed notebook; "
        "run scripts/execute_notebooks.py"
    )


def test_every_tutorial_block_is_mapped():
    mapped = {block for block, *_ in TUTORIAL_CALLS}
    assert mapped == set(TUTORIAL_BLOCKS), (
        f"blocks without a mapped call: {sorted(set(TUTORIAL_BLOCKS) - mapped)}; "
        f"unknown blocks: {sorted(mapped - set(TUTORIAL_BLOCKS))}"
    )
