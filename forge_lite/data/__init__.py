"""Data for GRPO: the prompt/answer format, the offline math problems, the rewards.

Every module here is light (no torch, no model) so the dataset actor, the
reward actor and the notebooks can all import it cheaply.
"""

from forge_lite.data.math_problems import generate_problems
from forge_lite.data.prompts import SYSTEM_PROMPT, extract_target, format_request, format_response

__all__ = [
    "SYSTEM_PROMPT",
    "extract_target",
    "format_request",
    "format_response",
    "generate_problems",
]
