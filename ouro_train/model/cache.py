"""KV cache for a looped decoder: one slot per (recurrent step, layer), step-major: slot = t·L + l.

Step t of a token attends to the step-t keys/values of earlier tokens, so each layer keeps T
independent histories. Built on transformers' `DynamicCache`, which supplies masking sizes, beam
reordering, cropping and batch selection.
"""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class OuroCache(DynamicCache):
    def __init__(self, num_layers: int, total_ut_steps: int):
        Cache.__init__(self, layers=[DynamicLayer() for _ in range(num_layers * total_ut_steps)])
        self.num_layers = num_layers
        self.total_ut_steps = total_ut_steps

    def slot(self, step: int, layer: int) -> int:
        return step * self.num_layers + layer


def has_slots(cache: Cache, num_slots: int) -> bool:
    """Whether `cache` can hold `num_slots` (a config-less DynamicCache grows on demand)."""
    return getattr(cache, "layer_class_to_replicate", None) is not None or len(cache.layers) >= num_slots
