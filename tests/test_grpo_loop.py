"""The GRPO loop on real services with the shipped model.

First the tutorial's ``simple_rl_step`` (part 2, "asynchronous
coordination"), with its mistakes corrected (docs/tutorial_differences.md): a group of two
(#group-of-one), the reference model as a service (#reference-model-service), its
logprobs aligned to the request (#max-req-tokens), ``train_step(inputs, targets)``
with ``call_one`` (#train-step-args, #call-returns-mesh). Then
one weight sync, then ``run_grpo`` itself: three steps, and a run stopped
halfway; no process may outlive either.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile

import pytest
import torch
from conftest import count_children, wait_for_children

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.actors.policy import Policy
from forge_lite.actors.reference_model import ReferenceModel
from forge_lite.actors.replay_buffer import ReplayBuffer
from forge_lite.actors.trainer import RLTrainer
from forge_lite.actors.weights import WeightStore
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.data.rewards import MathReward, ThinkingReward
from forge_lite.grpo import ComputeAdvantages, DatasetActor, Episode, Group, RewardActor
from forge_lite.grpo.__main__ import main as cli_main
from forge_lite.grpo.config import GRPOConfig, load_config
from forge_lite.grpo.loop import rollout_group
from forge_lite.grpo.rollout import MAX_UNIFORM_IN_A_ROW, RolloutWindow
from forge_lite.grpo.run import GRPORun, run_grpo
from forge_lite.grpo.services import RunComponents
from forge_lite.grpo.recorder import MetricsRecorder

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Small and quick: the shipped model's answers are about 20 tokens long.
FAST = [
    "steps=3", "group_size=2", "batch_size=4", "num_rollout_tasks=2", "eval_samples=4",
    "policy.backend=transformers", "policy.max_tokens=32", "data.request_len=96",
    "ref_model.kl_samples=null",  # every response's KL, so every step reports one
]


# ---------------------------------------------------------------- config


def test_config_loads_with_dotted_overrides():
    config = load_config(os.path.join(CONFIGS, "grpo_tiny.yaml"),
                         ["trainer.lr=1e-5", "policy.num_replicas=2", "steps=3", "progress=false"])
    assert config.trainer.lr == 1e-5  # YAML reads "1e-5" as a string; the float field converts it
    assert isinstance(config.trainer.lr, float)
    assert config.policy.num_replicas == 2 and config.steps == 3 and config.progress is False
    assert config.model is None  # the shipped model

    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['trainer.learning_rate'\].*'lr'"):
        load_config(None, ["trainer.learning_rate=0.1"])
    with pytest.raises(ValueError, match="policy.num_replicas must be int"):
        load_config(None, ["policy.num_replicas=two"])
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig.from_dict({"group_size": 1})
    with pytest.raises(ValueError, match=r"batch_size \(6\) must divide evenly over trainer.procs \(4\)"):
        GRPOConfig.from_dict({"batch_size": 6, "trainer": {"procs": 4}})
    with pytest.raises(ValueError, match="reward_actor.functions"):
        GRPOConfig.from_dict({"reward_actor": {"functions": ["speed"]}})
    with pytest.raises(SystemExit):  # the CLI refuses it before starting anything
        cli_main(["--config", os.path.join(CONFIGS, "grpo_tiny.yaml"), "stepz=3"])


def test_the_old_names_of_ref_model_and_reward_actor_load_with_a_warning(tmp_path):
    """A file or override written before the sections took the handles' names
    (``reference`` -> ``ref_model``, ``reward`` -> ``reward_actor``, in
    ``placement`` too) loads as the new names say, warning once per key."""
    old = tmp_path / "old.yaml"
    old.write_text(f"base: {os.path.join(CONFIGS, 'grpo_tiny.yaml')}\n"
                   "reference: {dtype: bfloat16}\nreward: {functions: [thinking]}\n"
                   "placement: {reference: host1, reward: 1}\n")
    with pytest.warns(FutureWarning) as heard:
        config = load_config(old, ["reference.kl_samples=null"])  # the override's wins, as for any key
    assert {str(w.message).split(" (")[0] for w in heard} == {
        f"config key {where}{key} is now {where}{new}"
        for where in ("", "placement.") for key, new in (("reference", "ref_model"), ("reward", "reward_actor"))
    }
    assert config == load_config(os.path.join(CONFIGS, "grpo_tiny.yaml"), [
        "ref_model.dtype=bfloat16", "reward_actor.functions=[thinking]", "ref_model.kl_samples=null",
        "placement.ref_model=host1", "placement.reward_actor=1",
    ])
    assert (config.ref_model.dtype, config.ref_model.kl_samples, config.placement.reward_actor) == ("bfloat16", None, 1)

    # Any other unknown key is still an error that names it, under an old section too.
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['referee'\].*'ref_model'"):
        GRPOConfig.from_dict({"referee": {"dtype": "bfloat16"}})
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"\['ref_model.functions'\]"):
        GRPOConfig.from_dict({"reference": {"functions": ["math"]}})


def test_gpu_config_names_the_tutorial_setup():
    config = load_config(os.path.join(CONFIGS, "grpo_qwen3_1_7b.yaml"))
    assert config.model == "Qwen/Qwen3-1.7B"
    assert config.data.path == "openai/gsm8k"
    assert config.policy.with_gpus and config.trainer.with_gpus and config.ref_model.with_gpus
    assert config.policy.backend == "vllm"


# ---------------------------------------------------------------- the tutorial's step


@pytest.fixture(scope="module")
async def components():
    """The tutorial's components, started together as in part 2."""
    store = WeightStore()
    (dataloader, policy, trainer, replay_buffer, compute_advantages, ref_model,
     reward_actor) = await asyncio.gather(
        DatasetActor.options(procs=1).as_actor(),
        Policy.options(procs=1, num_replicas=1).as_service(
            engine_config={"model": DEFAULT_MODEL, "backend": "transformers"},
            sampling_config={"n": 2, "max_tokens": 32},
            weight_store=store,
        ),
        # A large learning rate: one step must visibly change greedy answers.
        RLTrainer.options(procs=1).as_actor(
            model=DEFAULT_MODEL, optimizer={"name": "AdamW", "lr": 1e-2}, training={"seq_len": 1024},
            weight_store=store,
        ),
        ReplayBuffer.options(procs=1).as_actor(batch_size=2, max_policy_age=1, dp_size=1),
        ComputeAdvantages.options(procs=1).as_actor(),
        ReferenceModel.options(procs=1, num_replicas=1).as_service(model=DEFAULT_MODEL),
        RewardActor.options(procs=1, num_replicas=1).as_service(
            reward_functions=[MathReward(), ThinkingReward()]
        ),
    )
    yield dict(store=store, dataloader=dataloader, policy=policy, trainer=trainer, replay_buffer=replay_buffer,
               compute_advantages=compute_advantages, ref_model=ref_model, reward_actor=reward_actor)
    await asyncio.gather(
        DatasetActor.shutdown(dataloader), policy.shutdown(), RLTrainer.shutdown(trainer),
        ReplayBuffer.shutdown(replay_buffer), ComputeAdvantages.shutdown(compute_advantages),
        ref_model.shutdown(), reward_actor.shutdown(),
    )
    store.close()


@pytest.mark.slow
async def test_tutorial_simple_rl_step_runs_on_real_services(components):
    c = components
    pad_id = await c["dataloader"].pad_token.call_one()

    async def simple_rl_step(step: int):
        sample = await c["dataloader"].sample.call_one()
        prompt, target = sample["request"], sample["target"]
        actions = await c["policy"].generate.route(prompt=prompt)  # n=2: a group of two
        group = Group.new_group(step, 2, prompt, 0, pad_id, 512, 512, target)
        for episode, action in zip(group.episodes, actions):
            input_ids = torch.cat([action.prompt_ids, action.token_ids])
            ref_logprobs = await c["ref_model"].forward.route(
                input_ids.unsqueeze(0), max_req_tokens=len(action.prompt_ids), return_logprobs=True
            )
            episode.response = action.text
            episode.request_tokens = action.prompt_ids.tolist()
            episode.response_tokens = action.token_ids.tolist()
            episode.ref_logprobs = ref_logprobs[0]
            episode.reward = await c["reward_actor"].evaluate_response.route(
                prompt=prompt, response=action.text, target=target
            )
        advantages = await c["compute_advantages"].compute.call_one(group)
        for episode, advantage in zip(group.episodes, advantages):
            episode.advantage = advantage
            await c["replay_buffer"].add.call_one(episode)

        batch = await c["replay_buffer"].sample.call_one(curr_policy_version=0)
        inputs, targets = batch
        loss = await c["trainer"].train_step.call_one(inputs, targets)
        return group, loss

    group, loss = await simple_rl_step(0)
    assert isinstance(loss, float) and math.isfinite(loss)
    rewards = [e.reward for e in group.episodes]
    assert all(0.0 <= r <= 1.0 for r in rewards)
    advantages = [e.advantage for e in group.episodes]
    if rewards[0] == rewards[1]:
        assert advantages == [0.0, 0.0]
    else:  # +-1/sqrt(2): the sample std of two values
        assert sorted(advantages) == pytest.approx([-0.7071, 0.7071], abs=1e-3)
    # the reference logprobs are about the response tokens, one each
    assert all(len(e.ref_logprobs) == len(e.response_tokens) for e in group.episodes)
    assert await c["replay_buffer"].numel.call_one() == 0


@pytest.mark.slow
async def test_a_weight_sync_changes_the_policys_version_and_answers(components):
    c = components
    problems = [await c["dataloader"].sample.call_one() for _ in range(6)]
    greedy = {"n": 1, "temperature": 0.0, "max_tokens": 32}

    async def answers():
        return [(await c["policy"].generate.route(p["request"], **greedy))[0] for p in problems]

    before = await answers()
    versions_before = await c["policy"].get_version.fanout()

    # One step on a batch whose responses are all punished: it moves the weights.
    for i, (problem, completion) in enumerate(zip(problems[:2], before)):
        episode = Episode(f"sync{i}", problem["request"], 0, 0, 96, 32, problem["target"])
        episode.request_tokens = completion.prompt_ids.tolist()
        episode.response_tokens = completion.token_ids.tolist()
        episode.ref_logprobs = completion.logprobs
        episode.reward, episode.advantage = 0.0, -1.0
        await c["replay_buffer"].add.call_one(episode)
    inputs, targets = await c["replay_buffer"].sample.call_one(curr_policy_version=0)
    await c["trainer"].train_step.call_one(inputs, targets)
    new_version = max(versions_before) + 1
    await c["trainer"].push_weights.call_one(policy_version=new_version)
    await c["policy"].update_weights.fanout(policy_version=new_version)

    after = await answers()
    assert await c["policy"].get_version.fanout() == [new_version]
    assert {a.generator_version for a in after} == {new_version}
    assert [a.token_ids.tolist() for a in after] != [b.token_ids.tolist() for b in before]
    assert c["store"].latest() == new_version


# ---------------------------------------------------------------- run_grpo


class SameForEveryone:
    """A reward function that scores every response 0.5: each group it scores is uniform."""

    def __call__(self, prompt: str, response: str, target: str) -> float:
        return 0.5


@pytest.mark.slow
async def test_a_group_with_equal_rewards_is_skipped_but_counted(components):
    reward_actor = await RewardActor.options(procs=1, num_replicas=1).as_service(
        reward_functions=[SameForEveryone()]
    )
    try:
        parts = {name: handle for name, handle in components.items() if name != "store"}
        services = RunComponents(**{**parts, "reward_actor": reward_actor})
        pad_id = await components["dataloader"].pad_token.call_one()
        buffer = components["replay_buffer"]
        await buffer.clear.call_one()
        for skip, added, skipped in ((True, 0, 1), (False, 2, 0)):
            config = GRPOConfig.from_dict({
                "group_size": 2, "skip_uniform_groups": skip,
                "policy": {"max_tokens": 32}, "data": {"request_len": 96},
            })
            window = RolloutWindow()
            await rollout_group(services, config, pad_id, window)
            # Scored either way: the step's reward describes every response.
            assert window.rewards == [0.5, 0.5] and len(window.correct) == 2
            assert window.skipped_groups == skipped
            assert await buffer.numel.call_one() == added

        # A reward that never tells responses apart would leave the trainer waiting forever.
        window = RolloutWindow()
        window.uniform_in_a_row = MAX_UNIFORM_IN_A_ROW - 1
        config = GRPOConfig.from_dict({
            "group_size": 2, "skip_uniform_groups": True,
            "policy": {"max_tokens": 32}, "data": {"request_len": 96},
        })
        with pytest.raises(RuntimeError, match="skip_uniform_groups=false"):
            await rollout_group(services, config, pad_id, window)
    finally:
        await components["replay_buffer"].clear.call_one()
        await reward_actor.shutdown()


@pytest.mark.slow
async def test_with_kl_samples_the_reference_scores_only_a_sample(components):
    services = RunComponents(**{name: handle for name, handle in components.items() if name != "store"})
    pad_id = await components["dataloader"].pad_token.call_one()
    config = GRPOConfig.from_dict({
        "group_size": 4, "trainer": {"beta": 0.0}, "ref_model": {"kl_samples": 1},
        "policy": {"max_tokens": 32}, "data": {"request_len": 96},
    })
    try:
        group = await rollout_group(services, config, pad_id, RolloutWindow())
        assert [e.ref_logprobs is not None for e in group.episodes] == [True, False, False, False]
        assert group.episodes[0].behaviour_kl >= 0
        assert all(e.reward is not None and e.advantage is not None for e in group.episodes)
        assert await components["replay_buffer"].numel.call_one() == 4
    finally:
        await components["replay_buffer"].clear.call_one()


def run_store_dirs() -> set[str]:
    """The weight stores' default directories that exist now (under this
    process's temporary directory, which the test below makes its own)."""
    folder = os.path.join(tempfile.gettempdir(), f"forge_lite-{os.geteuid()}")  # the user's private folder
    return {name for name in os.listdir(folder) if name.startswith("weights_")} if os.path.isdir(folder) else set()


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_the_summary_prints_a_tiny_negative_mean_as_zero(tmp_path):
    from forge_lite.grpo.results import GRPOResult

    recorder = MetricsRecorder()
    for step, loss in enumerate([-1e-9, -2e-9]):
        recorder.record_step(step=step, reward_mean=0.5, accuracy=0.5, loss=loss, kl=0.0, trainer_version=step + 1,
                             episode_ages=(1,), buffer_size=0, tokens_per_s=100.0, step_time_s=0.1)
    result = GRPOResult(config=GRPOConfig(), recorder=recorder, eval_accuracy_before=None,
                        eval_accuracy_after=None, startup_s=1.0, train_s=0.2, wall_s=1.2, output_dir=str(tmp_path))
    (loss_line,) = [line for line in result.summary().splitlines() if line.startswith("loss")]
    assert loss_line.split() == ["loss", "0.0000", "0.0000"]


@pytest.mark.slow
async def test_a_three_step_run_records_every_step_and_leaves_no_process(tmp_path, monkeypatch):
    before = count_children()
    # The run's store is made in this process: in a temporary directory of the
    # test's own, no other run on the machine can add or remove one there.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert run_store_dirs() == set()
    config = load_config(os.path.join(CONFIGS, "grpo_tiny.yaml"),
                         FAST + [f"output_dir={tmp_path}", "progress=false"])
    recorder = MetricsRecorder()
    stores_seen = set()
    recorder.subscribe(lambda record: stores_seen.update(run_store_dirs()))

    result = await run_grpo(config, recorder=recorder)

    assert len(stores_seen) == 1  # the run's store, while it trained
    assert [s.step for s in recorder.steps] == [0, 1, 2]
    assert [s.trainer_version for s in recorder.steps] == [1, 2, 3]
    for s in recorder.steps:
        for name in ("reward_mean", "accuracy", "loss", "kl", "tokens_per_s", "step_time_s"):
            assert finite(getattr(s, name)), (name, getattr(s, name))
        # tokens_per_s is 0 in a window where every rollout waited for room in the buffer
        assert 0 <= s.accuracy <= 1 and s.kl >= 0 and s.tokens_per_s >= 0
        assert len(s.episode_ages) == 4 and all(a >= 1 for a in s.episode_ages)
        assert set(s.time_split_s) == {"generate", "reward", "reference", "train", "sync"}
        assert all(finite(v) for v in s.time_split_s.values())
    # the first step's batch was generated in its own window
    assert recorder.steps[0].tokens_per_s > 0
    # after each sync every replica serves the trainer's new version
    assert [(v.trainer_version, v.replica_versions) for v in recorder.versions] == [
        (1, (1,)), (2, (2,)), (3, (3,))
    ]
    assert 0 <= result.eval_accuracy_before <= 1 and 0 <= result.eval_accuracy_after <= 1
    assert os.path.getsize(result.curve_path) > 0
    with open(result.metrics_path) as metrics:
        assert len(metrics.readlines()) == 3
    assert result.output_dir == str(tmp_path)
    assert "held-out greedy accuracy (4 problems)" in result.summary()

    assert await wait_for_children(before) <= before
    assert run_store_dirs() == set()  # the run's own store is gone


@pytest.mark.slow
async def test_a_policy_replica_killed_mid_run_comes_back_and_the_run_goes_on(tmp_path):
    config = load_config(None, FAST + ["steps=16", "policy.num_replicas=2", "eval_samples=0",
                                       f"output_dir={tmp_path}", "progress=false"])
    recorder = MetricsRecorder()
    run = GRPORun(config, recorder=recorder)
    await run.start()
    kills = []

    def kill_after_step_2(record) -> None:
        if getattr(record, "step", None) == 2 and not kills and hasattr(record, "reward_mean"):
            # Killed while the rollouts generate and the next sync comes: both
            # see a replica die under them.
            kills.append(asyncio.ensure_future(run.services.policy.kill_replica(0)))

    recorder.subscribe(kill_after_step_2)
    try:
        result = await run.train()
        await kills[0]
        assert [s.step for s in recorder.steps] == list(range(16)) and result.steps_trained == 16
        # The killed replica came back and serves the run's last version, as the other does.
        await run.services.policy.wait_for_state(0, "HEALTHY", timeout=60)
        assert sorted(await run.services.policy.get_version.fanout()) == [16, 16]
        assert recorder.versions[-1].trainer_version == 16
    finally:
        await run.shutdown()


@pytest.mark.slow
async def test_a_run_cancelled_midway_shuts_everything_down(tmp_path):
    # Ctrl-C under asyncio.run cancels the main task: the same path.
    before = count_children()
    recorder = MetricsRecorder()
    # A data-parallel trainer too: its two processes must go as well.
    config = load_config(None, FAST + ["steps=1000", "trainer.procs=2", f"output_dir={tmp_path}",
                                       "progress=false"])
    run = asyncio.create_task(run_grpo(config, recorder=recorder))
    while not recorder.steps and not run.done():
        await asyncio.sleep(0.2)
    assert count_children() > before  # the services were running
    assert recorder.steps and finite(recorder.steps[0].loss)  # the two ranks trained a step
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert await wait_for_children(before) <= before


async def test_rollouts_start_a_round_only_while_the_buffer_holds_fewer_than_batches_ahead_batches():
    """``RolloutWindow.room(batches_ahead * batch_size)``: with 2 batches of 8
    allowed, a buffer of 8 untaken episodes leaves room; one of 16 does not,
    until the trainer takes a batch; a paused window has no room at all."""
    window = RolloutWindow(in_buffer=8)
    await asyncio.wait_for(window.room(2 * 8), timeout=1)  # one batch waiting: room for the next
    window.buffered(8)
    waiting = asyncio.ensure_future(window.room(2 * 8))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # two batches nobody has taken: no new round
    window.taken(8)
    await asyncio.wait_for(waiting, timeout=1)
    window.pause()
    paused = asyncio.ensure_future(window.room(2 * 8))
    await asyncio.sleep(0.05)
    assert not paused.done()
    window.resume()
    await asyncio.wait_for(paused, timeout=1)
    with pytest.raises(ValueError, match="batches_ahead must be >= 1"):
        GRPOConfig.from_dict({"batches_ahead": 0})
