"""The conversation format environments write in: ChatML, as text.

An environment talks to the policy in text: ``reset`` returns the prompt,
``step`` the text that continues the conversation after the model's turn.
The shipped models and Qwen3 share one chat format, ChatML: every message is
``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n``, and the prompt ends with
``<|im_start|>assistant\\n``, where the model writes. The model ends its turn
with ``<|im_end|>`` (its end-of-sequence token), so the environment's answer
starts with the newline the format puts after it.

Written out here rather than asked of a tokenizer's chat template, so an
environment process needs no tokenizer; ``tests/test_envs.py`` checks that
``prompt`` equals the shipped tokenizer's template, character for character.
"""

from __future__ import annotations

START, END = "<|im_start|>", "<|im_end|>"


def message(role: str, content: str) -> str:
    """One ChatML message: ``<|im_start|>role\\ncontent<|im_end|>\\n``."""
    return f"{START}{role}\n{content}{END}\n"


def prompt(system: str, user: str) -> str:
    """A conversation's opening: the system and user messages, then the
    assistant's header, where the model starts writing."""
    return message("system", system) + message("user", user) + f"{START}assistant\n"


def reply(role: str, content: str) -> str:
    """What follows a model turn that ended with ``<|im_end|>``: the newline,
    the environment's message as ``role`` ("user" or "tool"), and the
    assistant's header for the model's next turn.

    Example: ``reply("user", "Not quite, try again.")`` is
    ``"\\n<|im_start|>user\\nNot quite, try again.<|im_end|>\\n<|im_start|>assistant\\n"``.
    """
    return "\n" + message(role, content) + f"{START}assistant\n"
