"""Actor classes copied from the tutorial, verbatim but for the imports, so
tests can check that the tutorial's code runs on the kit unchanged."""

from monarch.actor import endpoint

from forge_lite.controller import ForgeActor


# Mixes sync and async endpoints, which plain Monarch 0.7 refuses at spawn time.
class ForgeCounter(ForgeActor):
    def __init__(self, initial_value: int):
        self.value = initial_value

    @endpoint
    def increment(self) -> int:
        self.value += 1
        return self.value

    @endpoint
    def get_value(self) -> int:
        return self.value

    @endpoint
    async def reset(self):
        self.value = 0
