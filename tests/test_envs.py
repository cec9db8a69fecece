"""The environments: the reset/step contract, the calculator's safe arithmetic,
bad actions answered with a clear observation (never a crash, never an eval),
and an EnvironmentActor service on real processes keeping each trajectory's
state on one replica."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
from faulty_envs import NaNOnTurnTwoEnv, NoObservationEnv, NoPromptEnv, ScriptedEnv

from forge_lite.assets import DEFAULT_MODEL
from forge_lite.data.math_problems import equation
from forge_lite.data.prompts import SYSTEM_PROMPT, format_request
from forge_lite.envs import CalculatorEnv, EpisodeOver, RetryEnv, StepResult, chat
from forge_lite.envs.actor import EnvironmentActor, make_environment
from forge_lite.envs.arithmetic import MAX_EXPRESSION_CHARS, CalcError, evaluate_expression, format_number
from forge_lite.envs.base import check_step
from forge_lite.envs.problems import ProblemStream, big_number_problems, shipped_problems

PROBLEM = {"question": "What is 347 + 589?", "answer": "347 + 589 = 936\n#### 936"}


# ---------------------------------------------------------------- the contract


def test_reset_returns_the_prompt_in_the_models_chat_format():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    assert RetryEnv().reset(PROBLEM) == format_request(tokenizer, PROBLEM["question"])
    prompt = CalculatorEnv().reset(PROBLEM)
    assert prompt.endswith("<|im_start|>user\nWhat is 347 + 589?<|im_end|>\n<|im_start|>assistant\n")
    assert "<calc>" in prompt and SYSTEM_PROMPT not in prompt


def test_step_returns_observation_reward_done_info_and_unpacks_like_gymnasium():
    env = CalculatorEnv()
    env.reset(PROBLEM)
    result = env.step("<calc>347 + 589</calc>")
    assert isinstance(result, StepResult)
    observation, reward, done, info = result
    assert observation == chat.reply("tool", "<result>936</result>")
    assert (reward, done) == (0.0, False)
    assert info == {"turn": 1, "tool_calls": 1, "correct": False, "expression": "347 + 589", "result": "936"}
    observation, reward, done, info = env.step("<answer>936</answer>")
    assert (observation, reward, done) == ("", 1.0, True)
    assert info["correct"] and info["answer"] == "936" and info["turn"] == 2


def test_a_finished_episode_refuses_more_steps_until_reset():
    env = RetryEnv()
    with pytest.raises(EpisodeOver, match="reset"):
        env.step("<answer>1</answer>")  # never reset
    env.reset(PROBLEM)
    assert env.step("<answer>936</answer>").done
    with pytest.raises(EpisodeOver):
        env.step("<answer>936</answer>")
    env.reset(PROBLEM)  # a new episode starts from turn 1
    assert env.step("<answer>936</answer>").info["turn"] == 1
    fresh = make_environment("retry")
    fresh.reset(PROBLEM)
    with pytest.raises(TypeError, match="text"):
        fresh.step(None)


def test_bad_settings_and_names_fail_with_what_to_use():
    with pytest.raises(ValueError, match="max_turns"):
        CalculatorEnv(max_turns=0)
    with pytest.raises(ValueError, match="tool_cost"):
        CalculatorEnv(tool_cost=-1)
    with pytest.raises(ValueError, match="calculator"):
        make_environment("chess")
    with pytest.raises(ValueError, match="####"):
        RetryEnv().reset({"question": "What is 1 + 1?", "answer": "2"})


# ---------------------------------------------------------------- what an environment returns

FINE = chat.reply("user", "Go on.")


@pytest.mark.parametrize(
    "returned, problem",
    [
        ((FINE, math.nan, False, {}), "reward is nan (float), expected a finite number"),
        ((FINE, math.inf, False, {}), "reward is inf (float)"),
        ((FINE, -math.inf, True, {}), "reward is -inf (float)"),
        ((FINE, np.float32("nan"), False, {}), "reward is nan (float32)"),
        ((FINE, 10**400, False, {}), "reward is 1000"),  # past float's range
        ((FINE, "1.0", False, {}), "reward is '1.0' (str), expected a finite number"),
        ((FINE, None, False, {}), "reward is None, expected a finite number"),
        ((None, 0.0, False, {}), "observation is None, expected str"),
        ((b"Go on.", 0.0, False, {}), "observation is b'Go on.' (bytes), expected str"),
        ((["Go on."], 0.0, False, {}), "observation is ['Go on.'] (list), expected str"),
        ((FINE, 0.0, None, {}), "done is None, expected bool"),
        ((FINE, 0.0, 1, {}), "done is 1 (int), expected bool"),
        ((FINE, 0.0, "yes", {}), "done is 'yes' (str), expected bool"),
        ((FINE, 0.0, False, None), "info is None, expected dict"),
        ((FINE, 0.0, False), "returned (" ),  # three values, not four
        (None, "returned None, expected StepResult(observation, reward, done, info)"),
    ],
)
def test_a_step_that_breaks_the_contract_is_an_error_naming_the_environment_and_turn(returned, problem):
    env = ScriptedEnv()
    env.script = [(FINE, 0.0, False, {}), returned]
    env.reset(PROBLEM)
    env.step("<answer>1</answer>")  # turn 1 keeps the contract
    with pytest.raises(ValueError) as error:
        env.step("<answer>2</answer>")
    message = str(error.value)
    assert message.startswith("ScriptedEnv.step on turn 2 returned") and problem in message


def test_every_problem_of_a_step_is_named_at_once():
    with pytest.raises(ValueError) as error:
        check_step(RetryEnv(), (None, math.nan, 0, []), 3)
    assert str(error.value) == (
        "RetryEnv.step on turn 3 returned a bad result: observation is None, expected str; "
        "reward is nan (float), expected a finite number; done is 0 (int), expected bool; "
        "info is [] (list), expected dict"
    )


@pytest.mark.parametrize("reward, value", [(True, 1.0), (False, 0.0), (1, 1.0), (-2, -2.0), (np.float64(0.5), 0.5),
                                           (np.int64(3), 3.0), (1e300, 1e300)])
def test_a_reward_that_is_a_finite_number_of_any_kind_is_a_float(reward, value):
    """As for reward functions: bool and int count as numbers."""
    result = check_step(RetryEnv(), (FINE, reward, False, {"k": 1}), 1)
    assert result == StepResult(FINE, value, False, {"k": 1}) and type(result.reward) is float


def test_a_prompt_that_is_not_text_is_an_error_naming_the_environment():
    with pytest.raises(ValueError, match=r"NoPromptEnv.reset \(turn 0\).*observation is None, expected str"):
        NoPromptEnv().reset(PROBLEM)


def test_an_environment_class_of_ones_own_is_built_and_anything_else_refused():
    assert isinstance(make_environment(ScriptedEnv, max_turns=2), ScriptedEnv)
    with pytest.raises(TypeError, match="Environment subclass"):
        make_environment(dict)


# ---------------------------------------------------------------- the calculator


@pytest.mark.parametrize(
    "action, reward, done, observation",
    [
        ("<answer>936</answer>", 1.0, True, ""),
        ("<think>347 + 589 = 926</think><answer>926</answer>", 0.0, True, ""),
        ("the answer is 936", 0.1, True, ""),  # no tag: MathReward's partial credit
        ("<calc>347+589</calc>", 0.0, False, "<result>936</result>"),
        ("<calc>12 / 0</calc>", 0.0, False, "<result>error: division by zero</result>"),
        ("<calc>347 + 589", 0.0, False, "<result>error: write the expression as <calc>expression</calc></result>"),
        ("<calc>__import__('os').system('touch /tmp/pwned')</calc>", 0.0, False, "<result>error: only numbers"),
        ("<calc>9**9**9</calc>", 0.0, False, "<result>error: exponent"),
        (f"<calc>{'1+' * 200}1</calc>", 0.0, False, "<result>error: expression too long"),
        ("<calc></calc>", 0.0, False, "<result>error: empty expression"),
        ("<calc>two plus two</calc>", 0.0, False, "<result>error: not an arithmetic expression"),
    ],
)
def test_calculator_turns(action, reward, done, observation):
    env = CalculatorEnv()
    env.reset(PROBLEM)
    began = time.perf_counter()
    result = env.step(action)
    assert time.perf_counter() - began < 0.5  # nothing expensive ran
    assert (result.reward, result.done) == (reward, done)
    assert observation in result.observation
    if not done:  # the tool's turn, then the model's next one
        assert result.observation.startswith("\n<|im_start|>tool\n")
        assert result.observation.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_calculator_ends_at_the_turn_limit_and_charges_tool_cost():
    env = CalculatorEnv(max_turns=2, tool_cost=0.05)
    env.reset(PROBLEM)
    assert env.step("<calc>1 + 1</calc>").reward == -0.05
    last = env.step("<calc>2 + 2</calc>")
    assert last.done and last.observation == "" and last.info["out_of_turns"]
    assert last.reward == -0.05 and last.info["tool_calls"] == 2
    env.reset(PROBLEM)  # a new episode counts its own calls
    assert env.step("<calc>1</calc>").info["tool_calls"] == 1


@pytest.mark.parametrize(
    "text, value",
    [("347 + 589", 936), ("(12 - 4) * 3", 24), ("7 / 2", 3.5), ("7 // 2", 3), ("-3 ** 2", -9),
     ("2 ^ 10", 1024), ("6 × 7", 42), ("84 ÷ 2", 42.0), ("1.5 + 1.5", 3.0), ("10 % 3", 1)],
)
def test_evaluate_expression_computes_arithmetic(text, value):
    assert evaluate_expression(text) == value


@pytest.mark.parametrize(
    "text, why",
    [
        ("__import__('os').system('echo pwned')", "only numbers"),
        ("open('/etc/passwd').read()", "only numbers"),
        ("(1).__class__", "only numbers"),
        ("x + 1", "only numbers"),
        ("'a' * 3", "not a number"),
        ("True + True", "not a number"),
        ("[1, 2]", "only numbers"),
        ("lambda: 1", "only numbers"),
        ("1 < 2", "only numbers"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("2 ** 100", "exponent"),
        ("10 ** 19", "too large"),
        ("99999999999 * 99999999999", "too large"),
        ("1e18 * 1e18", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("(" * 60 + "1" + ")" * 60, "too long"),
        ("((((((((((1))))))))))", None),  # nesting within the limit is fine
        ("1 +", "not an arithmetic expression"),
        ("", "empty"),
        ("1\x00", "not an arithmetic expression"),
    ],
)
def test_evaluate_expression_refuses_everything_else(text, why):
    if why is None:
        assert evaluate_expression(text) == 1
        return
    with pytest.raises(CalcError, match=why):
        evaluate_expression(text)
    assert len("(" * 60 + "1" + ")" * 60) > MAX_EXPRESSION_CHARS


def test_format_number_writes_results_as_people_do():
    assert [format_number(v) for v in (936, 6.0, 2 / 3, -1.5)] == ["936", "6", "0.6666666667", "-1.5"]


# ---------------------------------------------------------------- the tool model


def test_the_tool_model_knows_the_calculator_format():
    """The shipped tool model (scripts/train_tool_model.py): the tags are single
    tokens, and greedily it calls the tool on a bare equation, then copies the
    result into its answer."""
    from forge_lite.actors.engines import SamplingConfig
    from forge_lite.actors.engines.transformers_engine import TransformersEngine
    from forge_lite.assets import TOOL_MODEL

    engine = TransformersEngine(TOOL_MODEL, seed=0)
    tags = ["<calc>", "</calc>", "<result>", "</result>", "<answer>"]
    assert all(len(engine.tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1 for tag in tags)
    env = CalculatorEnv()
    conversation = env.reset({"question": "What is 612 + 279?", "answer": "#### 891"})
    actions = []
    while not env.done:
        completion = engine.generate([conversation], SamplingConfig(max_tokens=24, temperature=0.0))[0][0]
        actions.append(completion.text)
        result = env.step(completion.text)
        conversation += engine.tokenizer.decode(completion.token_ids) + result.observation
    assert actions == ["<calc>612 + 279</calc>", "<answer>891</answer>"]
    assert result.reward == 1.0


# ---------------------------------------------------------------- retry


def test_retry_gives_feedback_and_a_reward_that_falls_with_the_turns():
    rewards = []
    for wrong_turns in range(4):
        env = RetryEnv(max_turns=3)
        env.reset(PROBLEM)
        result = None
        for _ in range(wrong_turns):
            if result is not None and result.done:
                break
            result = env.step("<answer>1</answer>")
            if not result.done:
                assert result.observation == chat.reply("user", "Not quite, try again.")
        if result is None or not result.done:
            result = env.step("<think>347 + 589 = 936</think><answer>936</answer>")
        rewards.append(round(result.reward, 3))
        assert result.done
    assert rewards == [1.0, 0.667, 0.333, 0.0]


# ---------------------------------------------------------------- problems


def test_big_number_problems_are_fixed_for_test_and_never_leak_into_train():
    test = big_number_problems("test")
    assert len(test) == 200 and test == big_number_problems("test")
    assert all(len(equation(p).split()[0]) == 3 for p in test)
    train = big_number_problems("train", 500, seed=3)
    assert train == big_number_problems("train", 500, seed=3)
    assert not {equation(p) for p in train} & {equation(p) for p in test}
    assert len(shipped_problems("test")) == 200
    with pytest.raises(ValueError, match="count"):
        big_number_problems("train")
    with pytest.raises(ValueError, match="empty"):
        ProblemStream([])


# ---------------------------------------------------------------- as a service


@pytest.mark.timeout(120)
async def test_an_environment_service_keeps_each_trajectory_on_its_replica():
    env = await EnvironmentActor.options(procs=1, num_replicas=2).as_service(env="calculator")
    try:
        problems = [await env.sample_problem.route() for _ in range(4)]
        assert len({p["question"] for p in problems}) == 4
        assert len(await env.eval_problems.route(5)) == 5

        async def play(index: int, problem: dict) -> StepResult:
            async with env.session():
                await env.reset.route(f"t{index}", problem)
                expression = equation(problem).split(" = ")[0]
                tool = await env.step.route(f"t{index}", f"<calc>{expression}</calc>")
                result = tool.info["result"]
                return await env.step.route(f"t{index}", f"<answer>{result}</answer>")

        results = await asyncio.gather(*(play(i, p) for i, p in enumerate(problems * 2)))
        assert all(r.done and r.reward == 1.0 for r in results)
        assert await env.open_episodes.fanout() == [0, 0]  # finished trajectories are closed

        # Without a session, round robin sends the step to the other replica,
        # which never heard of the trajectory: a clear error, no crash.
        await env.reset.route("lost", problems[0])
        with pytest.raises(KeyError, match="session"):
            await env.step.route("lost", "<calc>1</calc>")
        await env.close.fanout("lost")
        assert await env.open_episodes.fanout() == [0, 0]
    finally:
        await env.shutdown()


@pytest.mark.timeout(120)
async def test_an_environment_service_refuses_what_breaks_the_contract_where_it_enters():
    """On real processes: the error reaches the caller as a ValueError naming
    the class, the problem and the turn, from the base class's check (a
    ``play`` returning NaN) and from the actor's (a ``step`` of its own)."""
    nan_env, no_observation, no_prompt = await asyncio.gather(*(
        EnvironmentActor.options(procs=1, num_replicas=1).as_service(env=cls)
        for cls in (NaNOnTurnTwoEnv, NoObservationEnv, NoPromptEnv)
    ))
    try:
        await nan_env.reset.route("a", PROBLEM)
        assert (await nan_env.step.route("a", "<answer>1</answer>")).reward == 0.0
        with pytest.raises(ValueError, match=r"^NaNOnTurnTwoEnv.step on turn 2 .*reward is nan"):
            await nan_env.step.route("a", "<answer>2</answer>")

        assert "What is 347 + 589?" in await no_observation.reset.route("b", PROBLEM)
        with pytest.raises(ValueError, match=r"^NoObservationEnv.step on turn 1 .*observation is None, expected str"):
            await no_observation.step.route("b", "<answer>1</answer>")

        with pytest.raises(ValueError, match=r"^NoPromptEnv.reset \(turn 0\).*observation is None"):
            await no_prompt.reset.route("c", PROBLEM)
        assert await no_prompt.open_episodes.fanout() == [0]  # nothing was opened

        # A closed trajectory is refused by id; the count falls back.
        assert await no_observation.open_episodes.fanout() == [1]
        await no_observation.close.route("b")
        assert await no_observation.open_episodes.fanout() == [0]
        with pytest.raises(KeyError, match="'b'.*closed"):
            await no_observation.step.route("b", "<answer>1</answer>")
    finally:
        await asyncio.gather(nan_env.shutdown(), no_observation.shutdown(), no_prompt.shutdown())
