"""The Policy's inference engines (transformers and vLLM) and the weight store.

Engine tests use a tiny random Qwen3 model (2 layers, hidden 128, head_dim 64,
byte-level tokenizer) built in a temporary directory: its near-uniform
distributions make "different seeds give different samples" certain, which a
trained model would not guarantee. The shipped model is checked separately
when it is present.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

from forge_lite.actors.engines import Completion, SamplingConfig, make_engine, resolve_model
from forge_lite.actors.engines.transformers_engine import CachedSequence, PrefixKVCache
from forge_lite.actors.weights import WeightStore

MAX_MODEL_LEN = 512


def build_tiny_qwen3(path: str) -> str:
    """A random Qwen3 model with a byte-level tokenizer (256 bytes + end-of-text), saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention refuses head_dim 16
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=eos,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_qwen3(str(tmp_path_factory.mktemp("tiny_qwen3")))


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def make_tf_engine(model: str, seed: int = 0, **options):
    return make_engine({"backend": "transformers", "model": model, **options}, seed=seed, device="cpu")


@pytest.fixture(scope="module")
def tf_engine(tiny_model):
    return make_tf_engine(tiny_model, max_model_len=MAX_MODEL_LEN)


def reference_logprobs(model, completion: Completion) -> torch.Tensor:
    """Logprobs of the completion's tokens from one full forward pass: what the trainer computes."""
    ids = torch.cat([completion.prompt_ids, completion.token_ids])[None]
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)
    start = len(completion.prompt_ids) - 1
    return logprobs[start:-1].gather(-1, completion.token_ids[:, None]).squeeze(-1)


def perturbed(state_dict: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        for name, tensor in state_dict.items()
    }


# The stop string test needs an ASCII character from the generated text: ASCII
# bytes never occur inside a multi-byte UTF-8 sequence, so it cannot appear early.
def first_ascii_char_after_start(text: str) -> str:
    return next(ch for ch in text[1:] if ch.isascii() and ch.isprintable())


LONG_PREFIX = "The quick brown fox jumps over the lazy dog. " * 6  # 270 bytes: over two 128-token vLLM blocks


def check_well_formed(completions, prompts, n, max_tokens, tokenizer):
    assert len(completions) == len(prompts)
    for prompt, samples in zip(prompts, completions):
        assert len(samples) == n
        for c in samples:
            assert isinstance(c, Completion)
            assert c.prompt == prompt
            assert c.prompt_ids.dtype == torch.long and c.prompt_ids.dim() == 1
            assert c.prompt_ids.tolist() == tokenizer(prompt)["input_ids"]
            assert c.token_ids.dtype == torch.long and c.token_ids.dim() == 1
            assert 1 <= len(c.token_ids) <= max_tokens
            assert c.logprobs.dtype.is_floating_point and c.logprobs.shape == c.token_ids.shape
            assert (c.logprobs <= 0).all()
            assert c.stop_reason in ("stop", "length")
            if c.stop_reason == "length":
                assert len(c.token_ids) == max_tokens
            assert isinstance(c.text, str)
            assert c.generator_version == 0
            assert c.replica is None


# --- SamplingConfig -----------------------------------------------------------


def test_sampling_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="max_token") as error:
        SamplingConfig.from_dict({"n": 2, "max_token": 5})
    assert "max_tokens" in str(error.value)  # the known options are listed
    with pytest.raises(ValueError, match="guided"):
        SamplingConfig().with_overrides(guided=True)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingConfig(n=0)
    config = SamplingConfig.from_dict({"n": 2, "max_tokens": 8, "temperature": 1.0, "top_p": 1.0})
    assert config.with_overrides(max_tokens=3) == SamplingConfig(n=2, max_tokens=3)
    assert SamplingConfig(stop="\n").stop == ["\n"]


# --- transformers engine --------------------------------------------------------


def test_transformers_completions_are_well_formed(tf_engine):
    prompts = ["What is 2 + 3?", "A much longer prompt, so that the batch needs left padding."]
    completions = tf_engine.generate(prompts, SamplingConfig(n=3, max_tokens=12))
    check_well_formed(completions, prompts, n=3, max_tokens=12, tokenizer=tf_engine.tokenizer)


def test_a_completion_survives_pickling_with_its_tensors(tf_engine):
    # Completions travel between processes in every Policy reply.
    completion = tf_engine.generate(["Pickle me"], SamplingConfig(max_tokens=6))[0][0]
    completion.replica = 1
    copy = pickle.loads(pickle.dumps(completion))
    for name in ("prompt_ids", "token_ids", "logprobs"):
        original, restored = getattr(completion, name), getattr(copy, name)
        assert isinstance(restored, torch.Tensor) and restored.dtype == original.dtype
        assert torch.equal(restored, original)
    assert (copy.text, copy.prompt, copy.stop_reason, copy.replica) == (
        completion.text, completion.prompt, completion.stop_reason, 1
    )


def test_transformers_logprobs_match_a_full_forward_pass(tf_engine, hf_model):
    # Batched, left-padded decoding and cache reuse must not change the numbers.
    prompts = ["short", "a longer prompt than the first one"]
    completions = tf_engine.generate(prompts, SamplingConfig(n=2, max_tokens=10))
    assert [len(samples) for samples in completions] == [2, 2]  # four completions compared below
    for samples in completions:
        for c in samples:
            assert len(c.token_ids) >= 1
            torch.testing.assert_close(c.logprobs, reference_logprobs(hf_model, c), atol=1e-4, rtol=0)


def test_transformers_engines_with_different_seeds_sample_differently(tiny_model):
    sampling = SamplingConfig(max_tokens=16, temperature=1.0)
    first, second, first_again = (make_tf_engine(tiny_model, seed=s) for s in (1, 2, 1))
    tokens = [e.generate(["Hello"], sampling)[0][0].token_ids.tolist() for e in (first, second, first_again)]
    assert tokens[0] != tokens[1]
    assert tokens[0] == tokens[2]


def test_request_seed_makes_sampling_reproducible(tf_engine):
    def sample(seed):
        return tf_engine.generate(["Hello"], SamplingConfig(max_tokens=16, seed=seed))[0][0].token_ids.tolist()

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_draw_samples_each_rows_distribution_and_never_a_cut_token():
    """The engine's sampler (inverse CDF, one uniform number per row) draws
    each row from its own distribution: frequencies over 20000 draws within
    0.015 of the probabilities (4 standard errors at p=0.5), a token of
    probability 0 never; non-finite probabilities are an error, not a token."""
    from forge_lite.actors.engines.transformers_engine import draw

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(probs)
    for _ in range(20000):
        counts[torch.arange(3), draw(probs, generator)] += 1
    frequencies = counts / 20000
    assert (frequencies - probs).abs().max() < 0.015, frequencies
    assert counts[probs == 0].sum() == 0
    # A seeded generator gives the same tokens again.
    first = draw(probs, torch.Generator().manual_seed(7))
    assert torch.equal(first, draw(probs, torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="not finite"):
        draw(torch.tensor([[float("nan"), 0.5]]), generator)


def test_tiny_top_p_is_greedy(tf_engine):
    greedy = tf_engine.generate(["Hello"], SamplingConfig(max_tokens=10, temperature=0.0))[0][0]
    nucleus = tf_engine.generate(["Hello"], SamplingConfig(max_tokens=10, top_p=1e-6))[0][0]
    assert nucleus.token_ids.tolist() == greedy.token_ids.tolist()


def test_transformers_multi_turn_reuses_the_cached_prefix(tf_engine, hf_model):
    tf_engine.reset_prefix_cache()
    turn1 = tf_engine.generate([LONG_PREFIX], SamplingConfig(max_tokens=8))[0][0]
    assert turn1.num_cached_tokens == 0
    turn2 = tf_engine.generate([LONG_PREFIX + " And then?"], SamplingConfig(max_tokens=8))[0][0]
    assert len(turn1.prompt_ids) <= turn2.num_cached_tokens < len(turn2.prompt_ids)
    # KV reused from the cache gives the same numbers as computing everything.
    torch.testing.assert_close(turn2.logprobs, reference_logprobs(hf_model, turn2), atol=1e-4, rtol=0)


def test_cache_hit_and_miss_give_the_same_greedy_output(tf_engine):
    prompt = LONG_PREFIX + " Greedy?"
    tf_engine.generate([prompt], SamplingConfig(max_tokens=4))  # fills the cache
    greedy = SamplingConfig(max_tokens=12, temperature=0.0)
    hit = tf_engine.generate([prompt], greedy)[0][0]
    tf_engine.reset_prefix_cache()
    miss = tf_engine.generate([prompt], greedy)[0][0]
    assert hit.num_cached_tokens == len(hit.prompt_ids) - 1  # all but the last prompt token
    assert miss.num_cached_tokens == 0
    assert hit.token_ids.tolist() == miss.token_ids.tolist()


def test_stop_string_ends_the_text_before_it(tf_engine):
    greedy = SamplingConfig(max_tokens=30, temperature=0.0)
    full = tf_engine.generate(["Stop here"], greedy)[0][0]
    stop = first_ascii_char_after_start(full.text)
    stopped = tf_engine.generate(["Stop here"], greedy.with_overrides(stop=[stop]))[0][0]
    assert stopped.stop_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]
    assert len(stopped.token_ids) < len(full.token_ids)


def test_transformers_load_weights_changes_output_and_drops_the_cache(tiny_model, hf_model):
    engine = make_tf_engine(tiny_model)
    greedy = SamplingConfig(max_tokens=12, temperature=0.0)
    before = engine.generate([LONG_PREFIX], greedy)[0][0]

    new_weights = perturbed(hf_model.state_dict())
    engine.load_weights(new_weights, version=3)
    after = engine.generate([LONG_PREFIX], greedy)[0][0]

    assert after.token_ids.tolist() != before.token_ids.tolist()
    assert after.num_cached_tokens == 0  # stale KV was dropped
    assert after.generator_version == 3
    updated = type(hf_model)(hf_model.config).eval()
    updated.load_state_dict(new_weights)
    torch.testing.assert_close(after.logprobs, reference_logprobs(updated, after), atol=1e-4, rtol=0)


def test_transformers_load_weights_rejects_foreign_keys(tf_engine, hf_model):
    state_dict = dict(hf_model.state_dict())
    state_dict["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    state_dict["model.norm.weight"] = torch.zeros_like(state_dict["model.norm.weight"])
    with pytest.raises(ValueError, match="layers.9"):
        tf_engine.load_weights(state_dict, version=1)
    # Nothing was copied: the engine still serves the weights it had.
    assert tf_engine.model.model.norm.weight.abs().sum() > 0
    assert tf_engine.weight_version == 0


def test_reset_prefix_cache_makes_the_next_prompt_uncached(tf_engine):
    tf_engine.generate([LONG_PREFIX], SamplingConfig(max_tokens=4))
    assert tf_engine.generate([LONG_PREFIX], SamplingConfig(max_tokens=4))[0][0].num_cached_tokens > 0
    tf_engine.reset_prefix_cache()
    assert tf_engine.generate([LONG_PREFIX], SamplingConfig(max_tokens=4))[0][0].num_cached_tokens == 0


def test_prompt_longer_than_the_context_is_refused(tf_engine):
    with pytest.raises(ValueError, match=f"600 tokens.*{MAX_MODEL_LEN} tokens"):
        tf_engine.generate(["x" * 600], SamplingConfig())
    with pytest.raises(ValueError, match="empty"):
        tf_engine.generate([""], SamplingConfig())


def test_transformers_requests_added_mid_generation_join_the_batch(tf_engine):
    # How the Policy serves with this engine: add_request, then step, one token per step.
    greedy = SamplingConfig(max_tokens=12, temperature=0.0)
    with pytest.raises(ValueError, match="600 tokens"):
        tf_engine.add_request("x" * 600, greedy)  # refused when added, so only its caller fails
    first = tf_engine.add_request("Hello", greedy)
    assert tf_engine.step() == {}  # one token of `first`
    second = tf_engine.add_request("Hello", greedy.with_overrides(n=2, max_tokens=3))
    with pytest.raises(RuntimeError, match="unfinished"):
        tf_engine.generate(["Hello"], greedy)  # would lose the running requests' completions
    finished_at = {}
    for step in range(2, 20):
        for request_id, completions in tf_engine.step().items():
            finished_at[request_id] = (step, completions)
        if len(finished_at) == 2:
            break
    # `second` joined at step 2 and needed 3 tokens: it did not wait for `first`'s batch to end.
    assert finished_at[second][0] <= 4
    assert len(finished_at[first][1]) == 1 and len(finished_at[second][1]) == 2
    assert all(len(c.token_ids) <= 3 for c in finished_at[second][1])
    alone = tf_engine.generate(["Hello"], greedy)[0][0]
    assert finished_at[first][1][0].token_ids.tolist() == alone.token_ids.tolist()
    assert finished_at[second][1][0].token_ids.tolist() == alone.token_ids.tolist()[:3]
    assert tf_engine.step() == {}  # nothing was left behind


def test_joining_and_leaving_the_batch_keeps_the_logprobs_exact(tf_engine, hf_model):
    # A longer prompt joins after 3 steps (the batch widens: the running rows
    # gain left padding), a shorter one 3 steps later, and rows leave at
    # different steps (leading padding columns are dropped). A greedy row runs
    # 80 tokens, past the room the KV buffers are first built with (64
    # columns), so they grow. None of it may change a number.
    sampling = SamplingConfig(n=2, max_tokens=10)
    long_run = tf_engine.add_request("Go on", SamplingConfig(max_tokens=80, temperature=0.0))
    request_ids = [long_run, tf_engine.add_request("short", sampling)]
    finished = {}
    for prompt, max_tokens in [("a prompt much longer than the first one", 5), ("mid-size", 14)]:
        for _ in range(3):
            finished.update(tf_engine.step())
        request_ids.append(tf_engine.add_request(prompt, sampling.with_overrides(max_tokens=max_tokens)))
    while len(finished) < len(request_ids):
        finished.update(tf_engine.step())
    assert len(finished[long_run][0].token_ids) == 80
    # Every request came back whole (n=1 for the long run, n=2 for the others),
    # so the loop below compares all seven completions.
    assert [len(finished[r]) for r in request_ids] == [1, 2, 2, 2]
    for request_id in request_ids:
        for c in finished[request_id]:
            torch.testing.assert_close(c.logprobs, reference_logprobs(hf_model, c), atol=1e-4, rtol=0)


def test_generation_stops_at_the_context_length(tf_engine):
    prompt = "y" * (MAX_MODEL_LEN - 3)
    completion = tf_engine.generate([prompt], SamplingConfig(max_tokens=50, temperature=0.0))[0][0]
    total = len(completion.prompt_ids) + len(completion.token_ids)
    assert total == MAX_MODEL_LEN or (total < MAX_MODEL_LEN and completion.stop_reason == "stop")


def test_prefix_kv_cache_evicts_least_recently_used_by_tokens():
    def entry(ids):
        kv = [torch.zeros(1, 1, len(ids), 2)]
        return CachedSequence(torch.tensor(ids), kv, kv)

    cache = PrefixKVCache(max_tokens=10)
    cache.store(entry([1, 2, 3, 4]))
    cache.store(entry([5, 6, 7, 8]))
    assert cache.longest_prefix(torch.tensor([1, 2, 3, 9]))[0] == 3  # touches [1, 2, 3, 4]
    cache.store(entry([9, 9, 9]))  # 11 tokens: the least recently used, [5, 6, 7, 8], goes
    assert cache.num_tokens == 7
    assert cache.longest_prefix(torch.tensor([5, 6]))[0] == 0
    cache.store(entry([1, 2, 3, 4, 5, 6]))  # extends [1, 2, 3, 4], which is now redundant
    assert len(cache) == 2 and cache.num_tokens == 9
    cache.store(entry(list(range(11))))  # bigger than the whole cache: not kept
    assert cache.num_tokens == 9


# --- make_engine ------------------------------------------------------------------


def test_make_engine_warns_about_keys_the_transformers_engine_ignores(tiny_model):
    with pytest.warns(UserWarning, match="gpu_memory_utilization"):
        make_tf_engine(tiny_model, gpu_memory_utilization=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tutorial's config must not warn
        make_tf_engine(tiny_model, tensor_parallel_size=1, pipeline_parallel_size=1, enforce_eager=False)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make_tf_engine(tiny_model, tensor_parallel_size=2)


def test_make_engine_rejects_bad_settings(tiny_model):
    with pytest.raises(ValueError, match="seed"):
        make_engine({"backend": "transformers", "model": tiny_model, "seed": 3}, seed=0)
    with pytest.raises(ValueError, match="backend"):
        make_engine({"backend": "onnx", "model": tiny_model}, seed=0)


def test_a_model_path_that_does_not_exist_is_named(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model") as error:
        make_engine({"backend": "transformers", "model": missing}, seed=0)
    assert "DEFAULT_MODEL" in str(error.value) or "local model directory" in str(error.value)


def test_a_hub_id_while_offline_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="forge-lite-tests/no-such-model.*offline"):
        resolve_model("forge-lite-tests/no-such-model")


def test_shipped_model_is_the_default_and_generates():
    from forge_lite.actors.engines import _shipped_model

    shipped = _shipped_model()
    if shipped is None:
        pytest.skip("the shipped model (forge_lite.assets.DEFAULT_MODEL) is not there yet")
    engine = make_engine({"backend": "transformers"}, seed=0, device="cpu")
    prompts = ["What is 2 + 3?"]
    check_well_formed(
        engine.generate(prompts, SamplingConfig(n=2, max_tokens=8)), prompts, 2, 8, engine.tokenizer
    )


# --- WeightStore ---------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    return WeightStore(str(tmp_path / "weights"))


def test_weight_store_round_trip_and_versions(store):
    assert store.versions() == [] and store.latest() is None
    state = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(4).to(torch.bfloat16)}
    store.put(2, state)
    store.put(0, {name: t + 1 for name, t in state.items()})
    assert store.versions() == [0, 2] and store.latest() == 2
    loaded = store.get(2)
    assert loaded.keys() == state.keys()
    for name in state:
        assert loaded[name].dtype == state[name].dtype
        torch.testing.assert_close(loaded[name], state[name], atol=0, rtol=0)
    store.drop(0)
    store.drop(0)  # already gone: fine
    assert store.versions() == [2]
    with pytest.raises(KeyError, match=r"version 5.*available: \[2\]"):
        store.get(5)
    with pytest.raises(ValueError, match="version"):
        store.put(-1, state)


def test_weight_store_takes_a_model_with_tied_embeddings(store, hf_model):
    # embed_tokens and lm_head share one tensor, which safetensors refuses as is.
    store.put(1, hf_model.state_dict())
    loaded = store.get(1)
    assert loaded.keys() == hf_model.state_dict().keys()  # the tied pair both there, nothing more
    for name, tensor in hf_model.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, atol=0, rtol=0)


def test_weight_store_keep_last_drops_older_versions(tmp_path):
    store = WeightStore(str(tmp_path), keep_last=2)
    for version in range(4):
        store.put(version, {"w": torch.full((2,), float(version))})
    assert store.versions() == [2, 3]


def test_weight_store_writes_atomically(store):
    store.put(1, {"w": torch.zeros(2)})
    store.put(1, {"w": torch.ones(2)})  # replacing a version swaps the whole file
    torch.testing.assert_close(store.get(1)["w"], torch.ones(2))
    # safetensors refuses a key that is not a str while it writes the file:
    # a write that fails midway publishes nothing.
    with pytest.raises(TypeError, match="str"):
        store.put(2, {1: torch.zeros(2)})
    assert store.versions() == [1]
    assert os.listdir(store.root) == ["v1.safetensors"]  # and leaves no temporary file
    # A half-written file of a writer that crashed is never taken for a version.
    open(os.path.join(store.root, ".v7.abc.tmp"), "wb").close()
    assert store.versions() == [1]


def test_each_default_weight_store_is_its_own_and_travels_as_its_directory():
    first, second = WeightStore(), WeightStore()
    assert first.root != second.root  # two runs never share versions by default
    first.put(4, {"w": torch.arange(3.0)})
    assert second.versions() == []
    # What an actor receives: the same directory, which its process must not delete.
    child = (
        "import pickle, sys\n"
        "s = pickle.loads(sys.stdin.buffer.read())\n"
        "print(s.latest(), s.get(s.latest())['w'].tolist())\n"
        "s.close()\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", child], input=pickle.dumps(first), capture_output=True, check=True
    ).stdout.decode()
    assert output.split("\n")[0] == "4 [0.0, 1.0, 2.0]"
    assert first.versions() == [4]  # the child's close() left it alone
    first.close()
    first.close()  # twice is fine
    assert not os.path.exists(first.root)
    second.close()
    # A directory the caller named is never deleted.
    named = WeightStore(second.root)
    named.close()
    assert os.path.isdir(second.root)


# --- vLLM engine (slow: one engine for the whole module, ~20 s to start) ---------------

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@pytest.fixture(scope="module")
def vllm_engine(tiny_model):
    config = {"backend": "vllm", "model": tiny_model, "max_model_len": MAX_MODEL_LEN, "enforce_eager": True}
    if torch.cuda.is_available():
        # On a GPU vLLM would pick bfloat16; the logprob checks compare with float32.
        # (On a CPU the engine's default is float32, which these tests check.)
        config["dtype"] = "float32"
    return make_engine(config, seed=0)


@pytest.mark.slow
@requires_vllm
def test_vllm_completions_are_well_formed_with_true_logprobs(vllm_engine, hf_model):
    prompts = ["What is 2 + 3?", "A much longer prompt than the first one."]
    completions = vllm_engine.generate(prompts, SamplingConfig(n=3, max_tokens=12))
    check_well_formed(completions, prompts, n=3, max_tokens=12, tokenizer=vllm_engine.tokenizer)
    for samples in completions:
        for c in samples:
            torch.testing.assert_close(c.logprobs, reference_logprobs(hf_model, c), atol=1e-3, rtol=0)


@pytest.mark.slow
@requires_vllm
def test_vllm_request_seeds(vllm_engine):
    def sample(seed):
        return vllm_engine.generate(["Hello"], SamplingConfig(max_tokens=16, seed=seed))[0][0].token_ids.tolist()

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


@pytest.mark.slow
@requires_vllm
def test_vllm_multi_turn_hits_the_prefix_cache_and_reset_clears_it(vllm_engine):
    vllm_engine.reset_prefix_cache()
    turn1 = vllm_engine.generate([LONG_PREFIX], SamplingConfig(max_tokens=8))[0][0]
    assert turn1.num_cached_tokens == 0
    turn2 = vllm_engine.generate([LONG_PREFIX + " And then?"], SamplingConfig(max_tokens=8))[0][0]
    # Only whole blocks are reused; on CPU a block is 128 tokens.
    assert turn2.num_cached_tokens >= 128
    vllm_engine.reset_prefix_cache()
    turn3 = vllm_engine.generate([LONG_PREFIX + " And then?"], SamplingConfig(max_tokens=8))[0][0]
    assert turn3.num_cached_tokens == 0


@pytest.mark.slow
@requires_vllm
def test_vllm_stop_string(vllm_engine):
    greedy = SamplingConfig(max_tokens=30, temperature=0.0)
    full = vllm_engine.generate(["Stop here"], greedy)[0][0]
    stop = first_ascii_char_after_start(full.text)
    stopped = vllm_engine.generate(["Stop here"], greedy.with_overrides(stop=[stop]))[0][0]
    assert stopped.stop_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]


@pytest.mark.slow
@requires_vllm
def test_vllm_prompt_longer_than_the_context_is_refused(vllm_engine):
    with pytest.raises(ValueError, match=f"600 tokens.*{MAX_MODEL_LEN} tokens"):
        vllm_engine.generate(["Fine", "x" * 600], SamplingConfig())
    with pytest.raises(ValueError, match="600 tokens"):
        vllm_engine.add_request("x" * 600, SamplingConfig())
    # Nothing of the refused calls stayed in the engine.
    assert len(vllm_engine.generate(["Fine"], SamplingConfig(max_tokens=2))[0][0].token_ids) <= 2


@pytest.mark.slow
@requires_vllm
def test_vllm_a_request_added_mid_generation_finishes_before_the_long_one(vllm_engine):
    # Continuous batching: a request added between steps joins the running
    # sequences at the next step instead of waiting for them to finish.
    greedy = SamplingConfig(max_tokens=40, temperature=0.0)
    long_request = vllm_engine.add_request("A long answer", greedy)
    finished = {}
    for _ in range(3):
        finished.update(vllm_engine.step())
    short_request = vllm_engine.add_request("A short one", SamplingConfig(n=2, max_tokens=2, seed=0))
    while short_request not in finished:
        finished.update(vllm_engine.step())
    assert long_request not in finished
    while long_request not in finished:
        finished.update(vllm_engine.step())
    assert [len(c.token_ids) for c in finished[short_request]] == [2, 2]
    long_answer = finished[long_request][0]
    assert long_answer.stop_reason == "length" and len(long_answer.token_ids) == 40
    assert long_answer.prompt == "A long answer" and long_answer.logprobs.shape == (40,)


@pytest.mark.slow
@requires_vllm
def test_vllm_load_weights_changes_output(vllm_engine, hf_model):
    greedy = SamplingConfig(max_tokens=12, temperature=0.0)
    original = hf_model.state_dict()
    before = vllm_engine.generate([LONG_PREFIX], greedy)[0][0]
    new_weights = perturbed(original)
    try:
        vllm_engine.load_weights(new_weights, version=1)
        after = vllm_engine.generate([LONG_PREFIX], greedy)[0][0]
        assert after.token_ids.tolist() != before.token_ids.tolist()
        assert after.num_cached_tokens == 0  # the prefix cache was dropped with the old weights
        assert after.generator_version == 1
        updated = type(hf_model)(hf_model.config).eval()
        updated.load_state_dict(new_weights)
        torch.testing.assert_close(after.logprobs, reference_logprobs(updated, after), atol=1e-3, rtol=0)
    finally:
        vllm_engine.load_weights(original, version=0)  # the engine is shared by the module
