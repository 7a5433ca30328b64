"""`OuroConfig`: the upstream `model_type: ouro` configuration, field for field.

Class defaults are upstream's (inherited from a Qwen2 config, so they describe a 7B-ish model, not
Ouro); real checkpoints set every architecture field in their config.json. The JSON written by
`save_pretrained` keeps upstream's layout (`rope_theta` + `rope_scaling`) so that upstream's remote code
and vLLM read our exports.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

LAYER_TYPES = ("full_attention", "sliding_attention")

_OURO_SHAPE = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                   num_key_value_heads=16, head_dim=128, total_ut_steps=4, rope_theta=1_000_000.0,
                   max_position_embeddings=65536, tie_word_embeddings=False, pad_token_id=0)
# The released checkpoints' architecture fields (2.6B: the 1.4B's 24 layers duplicated to 48).
RELEASED_ARCHITECTURES = {"1.4b": dict(_OURO_SHAPE, num_hidden_layers=24), "2.6b": dict(_OURO_SHAPE, num_hidden_layers=48)}


class OuroConfig(PreTrainedConfig):
    model_type = "ouro"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        layer_types: list[str] | None = None,
        attention_dropout: float = 0.0,
        total_ut_steps: int = 4,
        early_exit_threshold: float = 1.0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        if layer_types is None:
            layer_types = [
                "sliding_attention" if self.sliding_window is not None and i >= max_window_layers else "full_attention"
                for i in range(num_hidden_layers)
            ]
        self.layer_types = list(layer_types)
        self.attention_dropout = attention_dropout
        self.total_ut_steps = total_ut_steps
        self.early_exit_threshold = early_exit_threshold
        self._validate()
        super().__init__(**kwargs)

    # `head_dim` is not a declared upstream argument: it arrives through **kwargs (real configs carry it).
    @property
    def resolved_head_dim(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        params = getattr(self, "rope_parameters", None) or {}
        return params.get("rope_type", params.get("type", "default"))

    # The base class stores RoPE settings in `rope_parameters`; expose upstream's view of them.
    @property
    def rope_scaling(self) -> dict | None:
        if self.rope_type == "default":
            return None
        return {k: v for k, v in (self.rope_parameters or {}).items() if k != "rope_theta"}

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None) -> None:
        self.rope_parameters = value

    def _validate(self) -> None:
        if self.total_ut_steps < 1:
            raise ValueError(f"total_ut_steps must be >= 1, got {self.total_ut_steps}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"unknown layer_types {sorted(unknown)}; expected one of {LAYER_TYPES}")

    def to_dict(self) -> dict:
        # The base class folds `rope_theta`/`rope_scaling` into `rope_parameters`; write upstream's keys back.
        out = super().to_dict()
        out.pop("rope_parameters", None)
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = self.rope_scaling
        return out
