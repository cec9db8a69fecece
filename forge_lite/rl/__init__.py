"""The RL math the actors and the GRPO loop share, in the order a step uses it:

- ``episode``: an Episode (one response and what the trainer needs about
  it) and a Group of them;
- ``logprobs``: a model's logits -> per-token logprobs (the trainer, the
  reference model and the transformers engine all compute them here);
- ``advantages``: a group's rewards -> advantages (``group_advantages``);
- ``collate``: episodes -> the trainer's tensors;
- ``loss``: logprobs and advantages -> the GRPO loss and its variants, and
  the k3 KL to the reference.

Plain PyTorch (``response_logits`` also uses transformers' KV cache class):
no actors, no services, so both ``forge_lite.actors`` (the trainer, the
replay buffer, the reference model, the engine) and ``forge_lite.grpo``
(the loop) build on it, and neither imports the other's way back.
``tests/test_layout.py`` keeps this math here.

The functions a learner calls by hand (notebooks 01-02) are importable from
here: ``from forge_lite.rl import group_advantages, grpo_loss,
response_logprobs``. They are imported on first use: importing any module
of this package runs this file, and a light process (a RewardActor replica)
should not load torch for it.
"""

from forge_lite.lazy import lazy_exports

_HOMES = {
    "response_logprobs": "forge_lite.rl.logprobs",
    "group_advantages": "forge_lite.rl.advantages",
    "grpo_loss": "forge_lite.rl.loss",
}

__all__ = sorted(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
