"""Ouro LoopLM: a decoder whose L layers are applied T times with shared weights.

    h = embed(ids)
    for t in 0..T-1:                        # recurrent ("universal transformer") steps
        for l in 0..L-1: h = layer_l(h)     # KV cache slot t·L + l
        h = norm(h)                         # final norm after EVERY step; the normed state feeds step t+1
        H[t] = h ; gate[t] = exit_gate(h)   # per-token exit logit
    pdf[t] = sigmoid(gate[t]) · Π_{j<t} (1 - sigmoid(gate[j]))   (last step takes the remaining mass)

`OuroForCausalLM` is call-compatible with the upstream remote code (`exit_at_step`, `exit_threshold`,
`labels`, `use_cache`, `logits_to_keep`) and numerically equal to it; it also returns the exit pdf and
every step's hidden states from the same forward pass, which the training objectives need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from ouro_train.model.attention import document_ids, plan_attention, position_ids_from_cu_seqlens
from ouro_train.model.cache import OuroCache, has_slots, loop_slot
from ouro_train.model.checkpointing import parse_policy
from ouro_train.model.configuration import OuroConfig
from ouro_train.model.layers import OuroDecoderLayer, RMSNorm, RotaryEmbedding

logger = logging.get_logger(__name__)

_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


@dataclass
class OuroModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # (embeddings, step 0, ..., step T-1) on request
    step_hidden_states: tuple[torch.Tensor, ...] | None = None  # T × [B, S, d], each after the final norm
    gate_logits: torch.Tensor | None = None  # [B, S, T], raw exit-gate logits


@dataclass
class OuroCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    exit_pdf: torch.Tensor | None = None  # [B, S, T] over the full sequence
    step_hidden_states: tuple[torch.Tensor, ...] | None = None
    gate_logits: torch.Tensor | None = None  # [B, S, T]


def exit_pdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """[..., T] gate logits -> [..., T] exit distribution, in the logits' dtype like upstream."""
    lam = torch.sigmoid(gate_logits)
    survival = torch.ones_like(lam[..., 0])
    probs = []
    for t in range(lam.shape[-1] - 1):
        probs.append(lam[..., t] * survival)
        survival = survival * (1 - lam[..., t])
    probs.append(survival)
    return torch.stack(probs, dim=-1)


def exit_entropy(pdf: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of exit distributions [..., T] -> [...]."""
    return -(pdf * pdf.clamp_min(torch.finfo(pdf.dtype).tiny).log()).sum(-1)


def mixture_logits(lm_head: nn.Module, states: tuple[torch.Tensor, ...], pdf: torch.Tensor) -> torch.Tensor:
    """Σ_t p_t · lm_head(h_t), accumulated in the activation dtype in step order (as upstream)."""
    total = None
    for t, h in enumerate(states):
        term = pdf[..., t : t + 1] * lm_head(h)
        total = term if total is None else total + term
    return total


def threshold_exit_steps(pdf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per token, the first step whose cumulative exit probability reaches `threshold` (else the last)."""
    reached = pdf.cumsum(-1) >= threshold
    first = reached.to(torch.uint8).argmax(-1)
    return torch.where(reached.any(-1), first, pdf.shape[-1] - 1)


class OuroPreTrainedModel(PreTrainedModel):
    config_class = OuroConfig
    config: OuroConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OuroDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers=1):
        # transformers' `gradient_checkpointing_enable()` means per-layer checkpointing here.
        self.base_model.set_activation_checkpointing("layer" if enable else "none")


class OuroModel(OuroPreTrainedModel):
    def __init__(self, config: OuroConfig):
        super().__init__(config)
        if config.rope_type != "default":
            raise ValueError(f"rope type {config.rope_type!r} is not supported (Ouro checkpoints use default RoPE)")
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=self.padding_idx)
        self.layers = nn.ModuleList(OuroDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.resolved_head_dim, config.rope_theta)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.activation_checkpointing = "none"
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def set_activation_checkpointing(self, policy: str) -> None:
        """One of `CHECKPOINT_GRANULARITIES` (see `checkpointing`): `layer` checkpoints each layer
        application, `step` each recurrent step (all L layers), `step+layer` also each layer inside the
        recompute of a step; `:save_attn` / `:save_matmul` keep the attention / every matmul output of a
        layer checkpoint (selective recompute); `layer/k` checkpoints one layer application in k."""
        parse_policy(policy)
        self.activation_checkpointing = policy

    def compile_layers(self) -> None:
        """`torch.compile` each decoder layer in place: regional compilation. The layers share their
        code, so one compiled graph serves all L layers and T steps (recompiled only for new shapes);
        the loop, checkpointing and cache stay eager around it."""
        for layer in self.layers:
            layer.compile()

    @property
    def gradient_checkpointing(self) -> bool:  # read by transformers' `is_gradient_checkpointing`
        return self.activation_checkpointing != "none"

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        total_ut_steps: int | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        sequence_parallel=None,
        **kwargs,
    ) -> OuroModelOutput:
        """`sequence_parallel` (a `sequence_parallel.SequenceParallel`, training only): the inputs are the
        whole rows [B, S]; this rank embeds and returns its S/N tokens, attention sees all S."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        sp = sequence_parallel
        full = input_ids if inputs_embeds is None else inputs_embeds
        batch, seq = full.shape[:2]
        if sp is not None:
            if past_key_values is not None:
                raise ValueError("sequence parallelism is for training: it does not run with a KV cache")
            use_cache = False
            if inputs_embeds is None:
                input_ids = sp.shard(input_ids)
            else:
                inputs_embeds = sp.shard(inputs_embeds)
        h = embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        steps = total_ut_steps or self.config.total_ut_steps
        num_layers = len(self.layers)
        checkpointing = self.activation_checkpointing if torch.is_grad_enabled() else "none"

        use_cache = self.config.use_cache if use_cache is None else use_cache
        if checkpointing != "none":
            use_cache = False  # recomputation and an incrementally written cache do not mix
        if not use_cache:
            past_key_values = None
        elif past_key_values is None or not has_slots(past_key_values, num_layers * steps):
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError(
                    f"the given cache holds tokens but has {len(past_key_values.layers)} slots; a looped model with "
                    f"{num_layers} layers and {steps} steps needs {num_layers * steps} (one per step and layer)"
                )
            past_key_values = OuroCache(num_layers, steps)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0

        if cu_seq_lens is not None:
            position_ids = _position_ids_from_cu_seqlens(cu_seq_lens, batch, seq)
        doc_ids = document_ids(position_ids) if position_ids is not None and past_len == 0 else None
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=h.device)[None].expand(batch, -1)
        rope = self.position_embeddings(position_ids if sp is None else sp.shard(position_ids), h.dtype)
        plans = self.attention_plans(batch, seq, past_len, attention_mask, doc_ids, device=h.device)
        if sp is not None:  # the whole row's masks; each layer exchanges its q, k, v for head shards
            plans = {kind: dataclasses.replace(plan, sequence_parallel=sp) for kind, plan in plans.items()}

        step_states, gates = [], []
        for step in range(steps):
            h, gate = self.recurrent_step(h, step, rope, plans, past_key_values)
            step_states.append(h)
            gates.append(gate)

        step_states = tuple(step_states)
        return OuroModelOutput(
            last_hidden_state=step_states[-1],
            past_key_values=past_key_values,
            hidden_states=(embeds,) + step_states if output_hidden_states else None,
            step_hidden_states=step_states,
            gate_logits=torch.cat(gates, dim=-1),
        )

    def recurrent_step(self, h: torch.Tensor, step: int, rope, plans: dict, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One recurrent step (0-based `step`): the L layers and the final norm on `h` [B', S, d], then
        the exit gate: (normed state, gate logits [B', S, 1]).

        `rope` and `plans` are those of these rows (`position_embeddings`, `attention_plans`); `cache`
        (an `OuroCache`, or any cache with `update(k, v, slot)`) receives the step's keys and values in
        the slots `loop_slot(step, layer)`. `forward` runs it T times on all rows; compute-saving early-exit
        decoding runs it on the rows still looping. Activation checkpointing follows
        `set_activation_checkpointing` while gradients are enabled (no cache then)."""
        policy = parse_policy(self.activation_checkpointing if torch.is_grad_enabled() else "none")
        h = policy.run_step(self._layer_stack, h, step, rope, plans, None if policy.step else cache, policy)
        return h, self.early_exit_gate(h)

    def _layer_stack(self, h, step: int, rope, plans, cache, policy) -> torch.Tensor:
        for layer in self.layers:
            slot = loop_slot(step, layer.layer_idx, len(self.layers))  # also the layer application's index
            h = policy.run_layer(layer, slot, h, rope, plans[layer.attention_type], cache, slot)
        return self.norm(h)

    def position_embeddings(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) [B, S, head_dim] for `position_ids` [B, S], from fp32 tables."""
        return self.rotary_emb(position_ids, dtype)

    def attention_plans(self, batch: int, seq: int, past_len: int, attention_mask=None, doc_ids=None, *,
                        device: torch.device) -> dict:
        """The attention plan of one forward, per attention type (see `attention.plan_attention`)."""
        implementation = self.config._attn_implementation or "sdpa"
        common = dict(
            batch_size=batch, q_len=seq, past_len=past_len, device=device, attention_mask=attention_mask, doc_ids=doc_ids
        )
        plans = {"full_attention": plan_attention(implementation, **common)}
        if "sliding_attention" in self.config.layer_types:
            plans["sliding_attention"] = plan_attention(
                implementation, sliding_window=self.config.sliding_window, **common
            )
        return plans


def _position_ids_from_cu_seqlens(cu_seq_lens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Flash-attention style cumulative lengths over the flattened [batch·seq] tokens -> [batch, seq]."""
    row_starts = torch.arange(0, batch * seq, seq, device=cu_seq_lens.device)
    if not bool(torch.isin(row_starts, cu_seq_lens.to(row_starts.dtype)).all()):
        raise ValueError("cu_seq_lens must place a document boundary at the start of every row")
    return position_ids_from_cu_seqlens(cu_seq_lens, batch * seq).view(batch, seq)


class OuroForCausalLM(OuroPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        self.model = OuroModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def set_activation_checkpointing(self, granularity: str) -> None:
        self.model.set_activation_checkpointing(granularity)

    def compile_layers(self) -> None:
        self.model.compile_layers()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        exit_at_step: int | None = None,
        exit_threshold: float | None = None,
        use_weighted_exit: bool = False,
        total_ut_steps: int | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        compute_logits: bool = True,
        sequence_parallel=None,
        **kwargs,
    ) -> OuroCausalLMOutput | tuple:
        """Upstream's call signature, plus `total_ut_steps` and `cu_seq_lens` per call, and
        `compute_logits=False` (without labels) to return only the exit pdf, gate logits and step
        states: training objectives apply the head themselves. `sequence_parallel`: see `OuroModel`;
        every output then covers this rank's tokens only (with `compute_logits=False`, no labels)."""
        if output_attentions:
            raise ValueError("output_attentions is not supported by OuroForCausalLM (fused attention kernels)")
        if sequence_parallel is not None and (labels is not None or compute_logits):
            raise ValueError("sequence parallelism returns step states for the training objectives: pass "
                             "compute_logits=False and no labels (shard them with SequenceParallel.shard_labels)")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            total_ut_steps=total_ut_steps,
            cu_seq_lens=cu_seq_lens,
            sequence_parallel=sequence_parallel,
        )
        states = out.step_hidden_states
        pdf = exit_pdf(out.gate_logits)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep

        def kept(x: torch.Tensor) -> torch.Tensor:
            return x[:, keep] if isinstance(keep, slice) else x.index_select(1, keep)

        loss = None
        if labels is not None:
            # Upstream's training loss: cross-entropy of the exit-pdf-weighted mixture of step logits.
            logits = mixture_logits(self.lm_head, tuple(kept(s) for s in states), kept(pdf))
            loss_kwargs = {k: v for k, v in kwargs.items() if k in _LOSS_KWARGS}
            loss = self.loss_function(logits, labels, self.vocab_size, **loss_kwargs)
        elif not compute_logits:
            logits = None
        else:
            logits = self._inference_logits(tuple(kept(s) for s in states), kept(pdf), exit_at_step, exit_threshold,
                                            use_weighted_exit)

        result = OuroCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            exit_pdf=pdf,
            step_hidden_states=states,
            gate_logits=out.gate_logits,
        )
        return result if return_dict is not False else result.to_tuple()

    def _inference_logits(self, states, pdf, exit_at_step, exit_threshold, use_weighted_exit) -> torch.Tensor:
        steps = len(states)
        if exit_at_step is None:
            exit_at_step = getattr(self.config, "early_exit_step", None)
        if exit_threshold is None:
            exit_threshold = self.config.early_exit_threshold
        if isinstance(exit_at_step, int):
            if 0 <= exit_at_step < steps:
                return self.lm_head(states[exit_at_step])
            # Upstream falls through to the threshold rule for out-of-range steps; keep that, but say so.
            logger.warning_once(f"exit_at_step={exit_at_step} is outside 0..{steps - 1} (0-based); ignoring it")
        if exit_threshold is not None:
            chosen = threshold_exit_steps(pdf, exit_threshold)  # [B, S]
            stacked = torch.stack(states, dim=2)  # [B, S, T, d]
            index = chosen[..., None, None].expand(-1, -1, 1, stacked.shape[-1])
            return self.lm_head(stacked.gather(2, index).squeeze(2))
        if use_weighted_exit:
            return mixture_logits(self.lm_head, states, pdf)
        return self.lm_head(states[-1])
