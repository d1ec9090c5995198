"""Cumulative training: retrain on all data seen so far at every experience (the upper bound).

Its memory is every training sample seen, counted in `memory_bytes`, which is why it
is a reference point and not a method.
"""

from forgetless.strategies.base import Strategy, register_strategy
from forgetless.streams import Experience, Samples


@register_strategy("cumulative")
class Cumulative(Strategy):
    supports = ("classification", "generation")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Samples] = []

    def training_data(self, experience: Experience) -> Samples:
        self.seen.append(experience.train)
        return Samples.concat(self.seen)

    def memory_bytes(self) -> int:
        return sum(s.nbytes for s in self.seen)

    def state_dict(self) -> dict:
        seen = [{"x": s.x, "y": s.y, "task": s.task} for s in self.seen]
        return {**super().state_dict(), "seen": seen}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = [Samples(s["x"], s["y"], s["task"]) for s in state["seen"]]
