"""KV cache for a looped decoder: one slot per (recurrent step, layer), step-major: slot = t·L + l.

Step t of a token attends to the step-t keys/values of earlier tokens, so each layer keeps T
independent histories. Built on transformers' `DynamicCache`, which supplies masking sizes, beam
reordering, cropping and batch selection.
"""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


def loop_slot(step: int, layer: int, num_layers: int) -> int:
    """The cache slot of (recurrent step, layer): the one layout every KV cache of the model uses
    (`OuroCache`, early-exit decoding's, and a plain `DynamicCache` that generation may pass)."""
    return step * num_layers + layer


class LoopSlots:
    num_layers: int

    def slot(self, step: int, layer: int) -> int:
        return loop_slot(step, layer, self.num_layers)


class OuroCache(LoopSlots, DynamicCache):
    def __init__(self, num_layers: int, total_ut_steps: int):
        Cache.__init__(self, layers=[DynamicLayer() for _ in range(num_layers * total_ut_steps)])
        self.num_layers = num_layers
        self.total_ut_steps = total_ut_steps


def has_slots(cache: Cache, num_slots: int) -> bool:
    """Whether `cache` can hold `num_slots` (a config-less DynamicCache grows on demand)."""
    return getattr(cache, "layer_class_to_replicate", None) is not None or len(cache.layers) >= num_slots
