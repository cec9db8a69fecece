"""The actors of a GRPO job: Policy (and its engines), ReferenceModel,
RLTrainer, ReplayBuffer, and the weight store between trainer and policy.
Import each from its module, as the tutorial does:
``from forge_lite.actors.policy import Policy``."""
