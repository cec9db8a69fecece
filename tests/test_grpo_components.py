"""The GRPO pieces in one process: advantages, episodes, collate, loss, replay buffer."""

import math
from types import SimpleNamespace

import pytest
import torch

from forge_lite.actors.replay_buffer import LocalReplayBuffer
from forge_lite.grpo import Episode, Group, create_episode_from_grpo_data, episode_from_completion
from forge_lite.rl.advantages import group_advantages
from forge_lite.rl.collate import drop_padding_columns, grpo_collate
from forge_lite.rl.logprobs import response_logprobs, token_logprobs
from forge_lite.rl.loss import grpo_loss

PAD = 0


def make_episode(
    episode_id="e",
    policy_version=0,
    request_tokens=(5, 6, 7),
    response_tokens=(8, 9),
    request_len=4,
    response_len=3,
    reward=1.0,
    advantage=0.5,
):
    episode = Episode(episode_id, "a prompt", policy_version, PAD, request_len, response_len, "3")
    episode.request_tokens = list(request_tokens)
    episode.response_tokens = list(response_tokens)
    episode.ref_logprobs = torch.full((len(response_tokens),), -1.0)
    episode.reward = reward
    episode.advantage = advantage
    return episode


# ---------------------------------------------------------------- advantages


def test_advantages_use_the_sample_std():
    advantages = group_advantages([1.0, 0.0])
    # mean 0.5, sample std sqrt(0.5) = 0.7071 (the population std would be 0.5)
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert advantages == pytest.approx([expected, -expected])


def test_advantages_are_zero_mean_and_ordered_like_rewards():
    advantages = group_advantages([0.2, 1.0, 0.05, 0.6])
    assert sum(advantages) == pytest.approx(0.0, abs=1e-9)
    assert sorted(range(4), key=advantages.__getitem__) == [2, 0, 3, 1]


def test_equal_rewards_give_zero_advantages():
    assert group_advantages([0.7, 0.7, 0.7]) == pytest.approx([0.0, 0.0, 0.0])


def test_group_of_one_gets_zero_and_a_warning():
    with pytest.warns(UserWarning, match="groups of 2 or more"):
        assert group_advantages([1.0]) == [0.0]


def test_the_math_s_former_homes_still_import_it():
    # Notebooks 01 and 02 import these from where they lived before forge_lite/rl/ held the math.
    from forge_lite.grpo.advantages import group_advantages as from_grpo
    from forge_lite.rl.loss import response_logprobs as from_loss

    assert from_grpo is group_advantages
    assert from_loss is response_logprobs


# ---------------------------------------------------------------- episodes


def test_request_is_left_padded_and_response_right_padded():
    episode = make_episode(request_tokens=[5, 6, 7], response_tokens=[8, 9], request_len=5, response_len=4)
    assert episode.request_tensor.tolist() == [PAD, PAD, 5, 6, 7]
    assert episode.response_tensor.tolist() == [8, 9, PAD, PAD]
    assert episode.request_mask.tolist() == [False, False, True, True, True]
    assert episode.response_mask.tolist() == [True, True, False, False]
    assert episode.request_tensor.dtype == torch.long


def test_response_mask_keeps_an_eos_that_equals_the_pad_id():
    # A model without a pad token pads with EOS; the EOS it generated is real.
    episode = make_episode(response_tokens=[8, PAD], response_len=3)
    assert episode.response_mask.tolist() == [True, True, False]


def test_too_long_sequences_name_the_lengths():
    with pytest.raises(ValueError, match=r"5 request_tokens do not fit request_len=4"):
        make_episode(request_tokens=[1, 2, 3, 4, 5], request_len=4).request_tensor
    with pytest.raises(ValueError, match=r"4 response_tokens do not fit response_len=3"):
        make_episode(response_tokens=[1, 2, 3, 4], response_len=3).response_tensor


def test_new_group_makes_empty_episodes_with_shared_settings():
    group = Group.new_group(7, 3, "prompt", 2, PAD, 16, 8, target="42")
    assert len(group.episodes) == 3
    assert len({e.episode_id for e in group.episodes}) == 3
    assert all(
        (e.request, e.policy_version, e.request_len, e.response_len, e.target, e.reward)
        == ("prompt", 2, 16, 8, "42", None)
        for e in group.episodes
    )


def test_episode_from_completion():
    completion = SimpleNamespace(
        text="<answer>3</answer>",
        prompt_ids=torch.tensor([5, 6]),
        token_ids=torch.tensor([8, 9, 2]),
        logprobs=torch.tensor([-0.1, -0.2, -0.3]),
        generator_version=4,
    )
    sample = {"request": "What is 1 + 2?", "target": "3", "question": "q", "answer": "a"}
    episode = episode_from_completion(
        sample, completion, 1.0, torch.tensor([-1.0, -2.0, -3.0]), pad_id=PAD,
        request_len=4, response_len=4,
    )
    assert episode.policy_version == 4  # the generator's version, by default
    assert (episode.request, episode.target, episode.response) == (
        "What is 1 + 2?", "3", "<answer>3</answer>"
    )
    assert episode.request_tensor.tolist() == [PAD, PAD, 5, 6]
    assert episode.response_tensor.tolist() == [8, 9, 2, PAD]
    assert episode.padded_ref_logprobs.tolist() == [-1.0, -2.0, -3.0, 0.0]

    tutorial_named = create_episode_from_grpo_data(sample, completion, 1.0, torch.zeros(3), 2)
    assert tutorial_named.policy_version == 2
    assert tutorial_named.request_len == 512


# ---------------------------------------------------------------- collate


def test_collate_shapes_and_dp_chunks():
    episodes = [make_episode(f"e{i}", advantage=float(i)) for i in range(4)]
    inputs, targets = grpo_collate(episodes, dp_size=2)
    assert len(inputs) == len(targets) == 2
    for rank in range(2):
        assert inputs[rank]["tokens"].shape == (2, 4 + 3)
        assert inputs[rank]["attention_mask"].shape == (2, 7)
        assert targets[rank]["response"].shape == (2, 3)
        assert targets[rank]["ref_logprobs"].shape == (2, 3)
        assert targets[rank]["advantages"].shape == (2, 1)
        assert targets[rank]["padding_mask"].shape == (2, 3)
    # chunks are contiguous and in order
    assert targets[1]["advantages"].flatten().tolist() == [2.0, 3.0]
    assert inputs[0]["tokens"][0].tolist() == [PAD, 5, 6, 7, 8, 9, PAD]
    assert targets[0]["padding_mask"][0].tolist() == [True, True, False]
    assert targets[0]["ref_logprobs"][0].tolist() == [-1.0, -1.0, 0.0]


def test_dropping_padding_columns_keeps_every_real_tokens_logprob():
    from forge_lite.actors.hf_model import load_causal_lm, load_tokenizer
    from forge_lite.assets import DEFAULT_MODEL
    from forge_lite.rl.logprobs import causal_lm_logits

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_causal_lm(DEFAULT_MODEL, "float32", torch.device("cpu"))
    texts = [("What is 2 + 3?", "<think>2 + 3 = 5</think><answer>5</answer>"),
             ("A box holds 66 books. Sam takes out 21. How many are left?", "<answer>45</answer>")]
    episodes = []
    for number, (question, answer) in enumerate(texts):
        episode = make_episode(
            f"e{number}", request_tokens=tokenizer.encode(question), response_tokens=tokenizer.encode(answer),
            request_len=40, response_len=30,
        )
        episode.pad_id = tokenizer.pad_token_id
        episodes.append(episode)
    (batch,), (target,) = grpo_collate(episodes)
    trimmed, trimmed_target = drop_padding_columns(batch, target)

    longest_request = max(len(e.request_tokens) for e in episodes)
    longest_response = max(len(e.response_tokens) for e in episodes)
    assert trimmed["tokens"].shape == (2, longest_request + longest_response)
    assert trimmed_target["response"].shape == trimmed_target["padding_mask"].shape == (2, longest_response)
    assert trimmed_target["ref_logprobs"].shape == (2, longest_response)
    assert torch.equal(trimmed_target["advantages"], target["advantages"])

    with torch.no_grad():
        full = response_logprobs(causal_lm_logits(model, batch["tokens"], batch["attention_mask"]),
                                 batch["tokens"], 40)
        short = response_logprobs(causal_lm_logits(model, trimmed["tokens"], trimmed["attention_mask"]),
                                  trimmed["tokens"], longest_request)
    real = target["padding_mask"][:, :longest_response].bool()
    assert torch.allclose(full[:, :longest_response][real], short[real], atol=1e-5)
    # Nothing to drop: the batch comes back the same.
    again, _ = drop_padding_columns(trimmed, trimmed_target)
    assert torch.equal(again["tokens"], trimmed["tokens"])


def test_each_request_run_once_gives_the_logprobs_and_gradients_of_whole_rows():
    from forge_lite.actors.hf_model import load_causal_lm, load_tokenizer
    from forge_lite.assets import DEFAULT_MODEL
    from forge_lite.rl.logprobs import causal_lm_logits, response_logits

    REQUEST = 48
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    model = load_causal_lm(DEFAULT_MODEL, "float32", torch.device("cpu"))
    # Two prompts of different lengths (so different left padding), three
    # responses each of different lengths, rows of one group not adjacent.
    groups = {"What is 2 + 3?": ["<answer>5</answer>", "<think>2 + 3 = 5</think><answer>5</answer>", "6"],
              "A box holds 66 books. Sam takes out 21. How many are left?":
                  ["<answer>45</answer>", "<think>66 - 21</think>", "<answer>44</answer> no"]}
    episodes = []
    for number in range(3):
        for question, answers in groups.items():
            episode = make_episode(f"e{len(episodes)}", request_tokens=tokenizer.encode(question),
                                   response_tokens=tokenizer.encode(answers[number]), request_len=REQUEST,
                                   response_len=30, advantage=1.0 if number else -1.0)
            episode.pad_id = tokenizer.pad_token_id
            episodes.append(episode)
    (batch,), (target,) = grpo_collate(episodes)
    tokens, mask, real = batch["tokens"], batch["attention_mask"], target["padding_mask"].bool()

    def loss_and_grads(logprobs):
        loss = grpo_loss(logprobs, None, target["advantages"], target["padding_mask"], beta=0.0)
        return logprobs.detach(), torch.autograd.grad(loss, list(model.parameters()))

    whole, whole_grads = loss_and_grads(response_logprobs(causal_lm_logits(model, tokens, mask), tokens, REQUEST))
    shared, shared_grads = loss_and_grads(token_logprobs(response_logits(model, tokens, mask, REQUEST), tokens[:, REQUEST:]))
    assert torch.allclose(whole[real], shared[real], atol=1e-5)
    for a, b in zip(whole_grads, shared_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # It did share: a different response for one row changes only that row.
    assert len(torch.unique(tokens[:, :REQUEST], dim=0)) == 2

    # Rows that share nothing take the plain path, with the same numbers.
    firsts = [0, 1]
    with torch.no_grad():
        alone = token_logprobs(response_logits(model, tokens[firsts], mask[firsts], REQUEST), tokens[firsts, REQUEST:])
    assert torch.allclose(alone[real[firsts]], whole[firsts][real[firsts]], atol=1e-5)
    with pytest.raises(ValueError, match=f"request_len={tokens.shape[1]} must be"):
        response_logits(model, tokens, mask, tokens.shape[1])


def test_collate_rejects_what_cannot_batch():
    with pytest.raises(ValueError, match="do not split evenly"):
        grpo_collate([make_episode(), make_episode()], dp_size=3)
    with pytest.raises(ValueError, match="different"):
        grpo_collate([make_episode(), make_episode(request_len=8)])
    with pytest.raises(ValueError, match="no advantage"):
        grpo_collate([make_episode(advantage=None)])


# ---------------------------------------------------------------- loss


def loss_inputs(batch=2, length=3):
    return dict(
        ref_logprobs=torch.full((batch, length), -1.0),
        advantages=torch.tensor([[1.0], [-0.5]])[:batch],
        padding_mask=torch.ones(batch, length, dtype=torch.bool),
    )


def test_loss_is_minus_mean_advantage_when_policy_equals_reference():
    kwargs = loss_inputs()
    logprobs = kwargs["ref_logprobs"].clone()
    # KL is 0 and the ratio is 1, so each sequence contributes -A.
    assert grpo_loss(logprobs, **kwargs).item() == pytest.approx(-(1.0 - 0.5) / 2)


def test_loss_kl_term_is_k3():
    kwargs = loss_inputs(batch=1)
    kwargs["advantages"] = torch.zeros(1, 1)
    kwargs["ref_logprobs"] = torch.full((1, 3), math.log(2.0))
    logprobs = torch.zeros(1, 3)
    k3 = 2.0 - math.log(2.0) - 1.0  # exp(ref - lp) - (ref - lp) - 1
    assert grpo_loss(logprobs, **kwargs, beta=0.1).item() == pytest.approx(0.1 * k3)
    assert grpo_loss(logprobs, **kwargs, beta=0.5).item() == pytest.approx(0.5 * k3)


def test_loss_gradient_reaches_logprobs_as_minus_advantage():
    kwargs = loss_inputs()
    logprobs = kwargs["ref_logprobs"].clone().requires_grad_(True)
    grpo_loss(logprobs, **kwargs).backward()
    # d/dlp of -(exp(lp - lp.detach()) * A) = -A, averaged over 3 tokens and 2 sequences
    # (the KL gradient is 0 where lp == ref).
    expected = -torch.tensor([[1.0], [-0.5]]).expand(2, 3) / 3 / 2
    assert torch.allclose(logprobs.grad, expected)


def test_loss_ignores_padding_even_when_it_would_overflow():
    kwargs = loss_inputs()
    kwargs["padding_mask"] = torch.tensor([[True, True, False], [True, False, False]])
    logprobs = kwargs["ref_logprobs"].clone()
    logprobs[0, 2] = -1000.0  # exp(ref - lp) = exp(999) = inf at a padded position
    logprobs.requires_grad_(True)
    loss = grpo_loss(logprobs, **kwargs)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.0 - 0.5) / 2)  # per-sequence means over real tokens
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2] == 0 and logprobs.grad[1, 1:].eq(0).all()


def test_mask_decides_which_tokens_count():
    kwargs = loss_inputs(batch=1)
    kwargs["advantages"] = torch.zeros(1, 1)
    logprobs = torch.tensor([[-1.0, -1.0, -3.0]])  # only the last token differs from ref
    full = grpo_loss(logprobs, **kwargs).item()
    kwargs["padding_mask"] = torch.tensor([[True, True, False]])
    assert full > 0
    assert grpo_loss(logprobs, **kwargs).item() == 0.0


def test_response_logprobs_pick_the_next_token():
    tokens = torch.tensor([[0, 1, 2, 3]])
    # logits at column i put all mass on token i + 1 (the next one), except column 2
    logits = torch.full((1, 4, 4), -1e4)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 3, 0] = 0.0
    logits[0, 2] = 0.0  # uniform over 4 tokens
    logprobs = response_logprobs(logits, tokens, request_len=2)
    assert logprobs.shape == (1, 2)
    assert logprobs[0, 0].item() == pytest.approx(0.0)  # token 2, predicted by column 1
    assert logprobs[0, 1].item() == pytest.approx(math.log(0.25))  # token 3, column 2


def test_response_logprobs_needs_a_response():
    with pytest.raises(ValueError, match="request_len=4"):
        response_logprobs(torch.zeros(1, 4, 5), torch.zeros(1, 4, dtype=torch.long), 4)


# ---------------------------------------------------------------- replay buffer


def filled_buffer(count=6, seed=0, **settings):
    buffer = LocalReplayBuffer(**{"batch_size": 2, "max_policy_age": 1, "seed": seed, **settings})
    for i in range(count):
        buffer.add(make_episode(f"e{i}", policy_version=0, advantage=float(i)))
    return buffer


def sampled_ids(batch):
    inputs, targets = batch
    return [int(a) for chunk in targets for a in chunk["advantages"].flatten().tolist()]


def test_buffer_returns_none_until_it_has_a_batch():
    buffer = filled_buffer(count=1)
    assert buffer.sample(curr_policy_version=0) is None
    assert buffer.size() == 1  # nothing was taken
    buffer.add(make_episode("e1"))
    inputs, targets = buffer.sample(curr_policy_version=0)
    assert targets[0]["advantages"].shape == (2, 1)
    assert buffer.size() == 0  # sampled episodes leave the buffer


def test_buffer_extend_stores_a_group_all_or_none():
    buffer = filled_buffer(count=0)
    buffer.extend([make_episode("a"), make_episode("b")])
    assert buffer.size() == 2
    bad = make_episode("bad")
    bad.reward = float("nan")
    with pytest.raises(ValueError, match="'bad'.*reward=nan"):
        buffer.extend([make_episode("c"), bad])
    assert buffer.size() == 2  # "c" was not stored either


def test_buffer_evicts_by_policy_age_before_sampling():
    buffer = LocalReplayBuffer(batch_size=2, max_policy_age=1)
    for version in (0, 1, 2, 3):
        buffer.add(make_episode(f"v{version}", policy_version=version))
    assert buffer.sample(curr_policy_version=4) is None  # only v3 is young enough
    assert buffer.size() == 1
    buffer.add(make_episode("v4", policy_version=4))
    assert buffer.sample(curr_policy_version=4) is not None  # v3 (age 1) and v4 (age 0)
    buffer.add(make_episode("v5", policy_version=5))
    assert buffer.evict(curr_policy_version=7) == 1
    assert len(buffer) == 0


def test_buffer_samples_dp_chunks_and_batch_size_override():
    buffer = filled_buffer(count=8, dp_size=2)
    inputs, targets = buffer.sample(curr_policy_version=0)
    assert len(inputs) == 2 and all(chunk["tokens"].shape[0] == 2 for chunk in inputs)
    assert buffer.size() == 4
    inputs, targets = buffer.sample(curr_policy_version=0, batch_size=1)
    assert [chunk["tokens"].shape[0] for chunk in inputs] == [1, 1]
    assert buffer.size() == 2


def test_buffer_without_collate_returns_episode_lists():
    buffer = filled_buffer(count=4, collate=None, dp_size=2)
    chunks = buffer.sample(curr_policy_version=0)
    assert [len(chunk) for chunk in chunks] == [2, 2]
    assert all(isinstance(e, Episode) for chunk in chunks for e in chunk)


def test_buffer_keeps_episodes_when_collate_fails():
    buffer = LocalReplayBuffer(batch_size=1, max_policy_age=1)
    buffer.add(make_episode(advantage=None))
    with pytest.raises(ValueError, match="no advantage"):
        buffer.sample(curr_policy_version=0)
    assert buffer.size() == 1


def test_buffer_is_reproducible_with_a_seed():
    first = sampled_ids(filled_buffer(seed=3).sample(0))
    assert first == sampled_ids(filled_buffer(seed=3).sample(0))
    assert any(sampled_ids(filled_buffer(seed=s).sample(0)) != first for s in range(4, 10))


def test_buffer_state_dict_round_trip_resumes_identically():
    original = filled_buffer(seed=1)
    restored = LocalReplayBuffer(batch_size=2, max_policy_age=1)
    restored.load_state_dict(original.state_dict())
    assert restored.size() == original.size() == 6
    for _ in range(3):
        assert sampled_ids(restored.sample(0)) == sampled_ids(original.sample(0))


def test_buffer_clear_and_bad_settings():
    buffer = filled_buffer()
    buffer.clear()
    assert buffer.size() == 0
    with pytest.raises(ValueError, match="batch_size"):
        LocalReplayBuffer(batch_size=0, max_policy_age=1)
    with pytest.raises(TypeError, match="policy_version"):
        buffer.add("not an episode")
