"""The prompt and answer format shared by the dataset, the rewards and the trainer.

One place decides what a request looks like (a system prompt plus the question,
in the model's chat template) and what a good response looks like
(``<think>...</think><answer>N</answer>``). The shipped model was trained on
exactly these strings, and the math reward scores exactly this answer tag, so
changing the format here changes it everywhere at once.
"""

SYSTEM_PROMPT = (
    "Solve the math problem. Think inside <think></think>, "
    "then give the final number inside <answer></answer>."
)


def format_request(tokenizer, question: str) -> str:
    """The chat-formatted prompt for ``question``, ending where the assistant starts.

    Works with any tokenizer that has a chat template: the shipped one and the
    real Qwen3 tokenizers alike.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def format_response(reasoning: str, number: int | str) -> str:
    """A well-formed response: the reasoning in ``<think>``, the number in ``<answer>``."""
    return f"<think>{reasoning}</think><answer>{number}</answer>"


def extract_target(answer_text: str) -> str:
    """The bare number after ``####`` in a gsm8k-style answer (``"...\\n#### 72"`` -> ``"72"``).

    gsm8k writes thousands with commas (``#### 1,000``); the reward compares
    numbers, so the commas go.
    """
    if "####" not in answer_text:
        raise ValueError(
            f"answer has no '#### N' line: {answer_text[-80:]!r}; pass the dataset's "
            "'answer' field (gsm8k layout), not the worked solution alone"
        )
    return answer_text.rsplit("####", 1)[1].strip().replace(",", "")
