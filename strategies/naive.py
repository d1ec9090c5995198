"""Naive fine-tuning: train on each experience in turn, nothing else (the lower bound)."""

from forgetless.strategies.base import Strategy, register_strategy


@register_strategy("naive")
class Naive(Strategy):
    """The base loop unchanged."""

    supports = ("classification", "generation")
