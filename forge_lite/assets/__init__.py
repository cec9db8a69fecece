"""The small model and math set the kit ships, so everything runs offline.

``DEFAULT_MODEL`` is a tiny Qwen3-architecture model with its own tokenizer,
trained by ``scripts/train_tiny_model.py`` to answer two-digit arithmetic as
``<think>...</think><answer>N</answer>`` (right about half the time, so GRPO
has room to improve it). It loads with ``AutoTokenizer``,
``AutoModelForCausalLM`` and vLLM like a hub model.

``TOOL_MODEL`` is the same model taught to call a calculator
(``<calc>347 + 589</calc>``, then ``<answer>`` after the tool's
``<result>``), sometimes but not reliably, by ``scripts/train_tool_model.py``;
``forge_lite.envs.calculator`` is the environment it plays.

``MATH_DATA_DIR`` holds ``train.jsonl`` and ``test.jsonl`` in the gsm8k layout
(``question``, ``answer`` ending in ``#### N``), made by
``scripts/make_math_dataset.py``; load them with
``datasets.load_dataset("json", data_files=...)``.
"""

from pathlib import Path

_ASSETS = Path(__file__).resolve().parent

DEFAULT_MODEL = str(_ASSETS / "model")
TOOL_MODEL = str(_ASSETS / "tool_model")
MATH_DATA_DIR = str(_ASSETS / "math")

__all__ = ["DEFAULT_MODEL", "MATH_DATA_DIR", "TOOL_MODEL"]
