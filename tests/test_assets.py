"""The shipped model and math set: they load like hub assets and speak the kit's format.

Everything here runs in a few seconds except the vLLM check (marked slow),
which starts a real engine in a child process.
"""

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from forge_lite.assets import DEFAULT_MODEL, MATH_DATA_DIR
from forge_lite.data.math_problems import DISTINCT_EQUATIONS, equation, generate_problems
from forge_lite.data.prompts import SYSTEM_PROMPT, extract_target, format_request, format_response

REPO = Path(__file__).resolve().parents[1]
WELL_FORMED = re.compile(r"<think>(.+)</think><answer>(-?\d+)</answer>")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()


@pytest.fixture(scope="module")
def math_set():
    files = {split: str(Path(MATH_DATA_DIR) / f"{split}.jsonl") for split in ("train", "test")}
    return load_dataset("json", data_files=files)


def greedy_response(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    prompt = tokenizer(format_request(tokenizer, question), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


# --- tokenizer -----------------------------------------------------------------------------


def test_chat_template_is_qwen_style_and_ends_at_the_assistant_turn(tokenizer):
    prompt = format_request(tokenizer, "What is 47 + 38?")
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 47 + 38?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_eos_and_pad_are_distinct_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_every_digit_is_its_own_token(tokenizer):
    for number in ("0", "7", "47", "100", "9081726354"):
        ids = tokenizer(number, add_special_tokens=False)["input_ids"]
        assert [tokenizer.decode([i]) for i in ids] == list(number)
    # The same digit is the same token wherever it stands.
    in_text = tokenizer.tokenize("What is 47 + 38?")
    assert [t for t in in_text if t.isdigit()] == ["4", "7", "3", "8"]


def test_answer_tags_are_single_tokens_that_survive_skip_special_tokens(tokenizer):
    response = format_response("47 + 38 = 85", 85) + tokenizer.eos_token
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tokens.count(tag) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>47 + 38 = 85</think><answer>85</answer>"


def test_any_text_round_trips(tokenizer):
    text = "Grüße, 15% of 240 is 36 🙂\n\tdone"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


# --- model -----------------------------------------------------------------------------------


def test_model_is_a_small_qwen3_that_vllm_cpu_accepts(model, tokenizer):
    config = model.config
    assert config.architectures == ["Qwen3ForCausalLM"]
    assert config.head_dim >= 64  # vLLM's CPU attention refuses smaller heads
    assert config.max_position_embeddings >= 2048  # multi-turn conversations fit
    assert config.vocab_size >= len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_model_answers_in_the_kit_format(model, tokenizer, math_set):
    questions = math_set["test"]["question"][:8]
    responses = [greedy_response(model, tokenizer, q) for q in questions]
    well_formed = [r for r in responses if WELL_FORMED.fullmatch(r)]
    assert len(well_formed) >= 6, responses


# --- math set ------------------------------------------------------------------------------------


def test_math_set_loads_like_gsm8k(math_set):
    assert set(math_set) == {"train", "test"}
    assert math_set["train"].num_rows == 2000 and math_set["test"].num_rows == 200
    for row in math_set["test"]:
        assert set(row) == {"question", "answer"}
        worked, final = row["answer"].split("\n#### ")
        left, result = worked.split(" = ")
        assert eval(left) == int(result) == int(final)  # noqa: S307 (our own "a + b" strings)
        assert extract_target(row["answer"]) == final


def test_splits_share_no_equation(math_set):
    train = {equation(row) for row in math_set["train"]}
    test = {equation(row) for row in math_set["test"]}
    assert len(train) == 2000 and len(test) == 200
    assert not train & test


def test_shipped_files_are_what_the_script_generates():
    spec = importlib.util.spec_from_file_location("make_math_dataset", REPO / "scripts" / "make_math_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    test = generate_problems(script.TEST_SIZE, seed=script.TEST_SEED)
    train = generate_problems(script.TRAIN_SIZE, seed=script.TRAIN_SEED, exclude={equation(p) for p in test})
    for split, problems in (("train", train), ("test", test)):
        shipped = (Path(MATH_DATA_DIR) / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in shipped] == problems


def test_generator_is_deterministic_and_honours_exclude():
    first = generate_problems(50, seed=7)
    assert generate_problems(50, seed=7) == first
    assert generate_problems(50, seed=8) != first
    excluded = {equation(p) for p in first}
    assert not excluded & {equation(p) for p in generate_problems(500, seed=7, exclude=excluded)}


def test_generator_refuses_more_problems_than_distinct_equations():
    with pytest.raises(ValueError, match="distinct equations"):
        generate_problems(DISTINCT_EQUATIONS + 1, seed=0)


# --- format helpers -------------------------------------------------------------------------------


def test_format_helpers_round_trip(math_set):
    row = math_set["train"][0]
    target = extract_target(row["answer"])
    response = format_response(equation(row), target)
    assert WELL_FORMED.fullmatch(response).groups() == (equation(row), target)


def test_extract_target_reads_gsm8k_answers():
    assert extract_target("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072") == "1072"
    with pytest.raises(ValueError, match="####"):
        extract_target("47 + 38 = 85")


def test_format_request_rejects_a_non_string_question(tokenizer):
    with pytest.raises(TypeError, match="question must be a str"):
        format_request(tokenizer, {"question": "What is 1 + 1?"})


# --- vLLM ------------------------------------------------------------------------------------------

VLLM_CHECK = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    print("RESULT", json.dumps([[len(o.prompt_token_ids), o.outputs[0].text] for o in outputs]))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_model_generates_in_vllm_offline(tokenizer, math_set):
    prompts = [format_request(tokenizer, q) for q in math_set["test"]["question"][:8]]
    run = subprocess.run(
        [sys.executable, "-c", VLLM_CHECK, DEFAULT_MODEL, json.dumps(prompts)],
        capture_output=True, text=True, timeout=240,
    )
    result_lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and result_lines, run.stderr[-3000:]
    results = json.loads(result_lines[0].removeprefix("RESULT "))
    # vLLM tokenizes the prompt exactly as transformers does...
    assert [n for n, _ in results] == [len(tokenizer(p)["input_ids"]) for p in prompts]
    # ...and the model answers in the kit's format there too.
    texts = [text for _, text in results]
    assert sum(bool(WELL_FORMED.fullmatch(t)) for t in texts) >= 6, texts
