"""The RL math the actors and the GRPO loop share: an Episode and a Group of
them, the collate that turns episodes into the trainer's tensors, and the
GRPO loss. Plain PyTorch: no actors, no services, so both ``forge_lite.actors``
(the trainer, the replay buffer, the reference model) and ``forge_lite.grpo``
(the loop) build on it, and neither imports the other's way back.
"""
