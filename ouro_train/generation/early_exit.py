"""Cached decoding with compute-saving early exit (the paper's Q-exit).

Upstream's generation runs all T recurrent steps for every token and only *reads* an earlier step's
logits when the cumulative exit probability reaches the threshold. Here a decoding token really stops
looping at its exit step:

    prefill: all T steps for every prompt token (later tokens need every step's cache)
    per new token, per step t = 0..T-1, on the rows still running:
        h = norm(layers(h))                    # cache slots t·L + l
        cdf_t = cumsum(exit_pdf(gates))[t]     # model dtype, exactly as OuroForCausalLM
        rows with cdf_t >= threshold (or t = T-1) exit: their logits come from this step's h
        and their deeper KV slots (t+1..T-1, every layer) are filled by the `kv_fill` strategy:
            copy     the exit step's K/V (the paper's "last step" sharing, §5.4.2)
            average  the mean of the K/V of the steps computed (0..t)

Only running rows go through the deeper layers (index-selected), so compute is saved in batches too.
With a threshold of 1.0 or more the exit mass reaches the threshold before the last step only by
rounding (the cumulative sum in the model dtype can round up to 1.0), so all T steps run for every
token; the readout still follows the model's rule, and the tokens are exactly those of
`OuroForCausalLM.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ouro_train.model import LoopSlots, OuroCache, OuroForCausalLM, exit_pdf, threshold_exit_steps

KV_FILLS = ("copy", "average")


@dataclass
class EarlyExitOutput:
    sequences: torch.Tensor  # [B, P + N]: the (left-padded) prompts, then the new tokens (pad after a stop)
    new_tokens: torch.Tensor  # [B, N]
    steps: torch.Tensor  # [B, N] recurrent steps run for the forward that produced each token; 0 after a stop
    cache: "ExitKVCache"  # one slot per (step, layer), as decoding left it

    @property
    def mean_steps(self) -> float:
        """Mean recurrent steps per generated token (the first token's forward is the prefill: all T)."""
        produced = self.steps > 0
        return float(self.steps[produced].float().mean()) if produced.any() else 0.0


class ExitKVCache(LoopSlots):
    """K/V per slot (`slot(step, layer)`), [B, KVH, S, D], grown by one position per decoding step.

    During a step only `rows` (the rows still running) are computed: `update` receives their K/V,
    writes them into the new position's column and returns their histories. Columns of rows that do
    not run are written by `fill_deeper_steps` (exited rows) or stay zero (finished rows, never read).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], num_layers: int, steps: int):
        if len(keys) != num_layers * steps:
            raise ValueError(f"{len(keys)} cache slots for {num_layers} layers x {steps} steps")
        self.keys, self.values = keys, values
        self.num_layers, self.steps = num_layers, steps
        self.rows: torch.Tensor | None = None  # None: all rows run

    @classmethod
    def from_prefill(cls, cache: OuroCache) -> "ExitKVCache":
        return cls([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                   cache.num_layers, cache.total_ut_steps)

    def get_seq_length(self) -> int:
        return self.keys[0].shape[-2]

    def begin_position(self) -> None:
        self._new_keys = [torch.zeros_like(k[:, :, -1:]) for k in self.keys]
        self._new_values = [torch.zeros_like(v[:, :, -1:]) for v in self.values]
        self._written = [False] * len(self.keys)
        self.rows = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is None:
            new_k, new_v = keys, values
        else:
            new_k, new_v = self._new_keys[slot], self._new_values[slot]
            new_k[self.rows], new_v[self.rows] = keys, values
        self.keys[slot] = torch.cat([self.keys[slot], new_k], dim=-2)
        self.values[slot] = torch.cat([self.values[slot], new_v], dim=-2)
        self._written[slot] = True
        if self.rows is None:
            return self.keys[slot], self.values[slot]
        return self.keys[slot][self.rows], self.values[slot][self.rows]

    def fill_deeper_steps(self, rows: torch.Tensor, exit_step: int, strategy: str) -> None:
        """K/V of slots (exit_step+1.., every layer) at the new position, for rows exiting at exit_step."""
        for layer in range(self.num_layers):
            computed = [self.slot(s, layer) for s in range(exit_step + 1)]
            for store, new in ((self.keys, self._new_keys), (self.values, self._new_values)):
                if strategy == "copy":
                    fill = store[computed[-1]][rows, :, -1:]
                else:
                    fill = torch.stack([store[slot][rows, :, -1:] for slot in computed]).mean(0)
                for step in range(exit_step + 1, self.steps):
                    new[self.slot(step, layer)][rows] = fill

    def end_position(self) -> None:
        """Slots no running row reached (every row exited earlier) get their filled column now."""
        for slot, written in enumerate(self._written):
            if not written:
                self.keys[slot] = torch.cat([self.keys[slot], self._new_keys[slot]], dim=-2)
                self.values[slot] = torch.cat([self.values[slot], self._new_values[slot]], dim=-2)
        del self._new_keys, self._new_values, self._written
        self.rows = None


@torch.no_grad()
def generate_early_exit(
    model: OuroForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    exit_threshold: float | None = None,
    total_ut_steps: int | None = None,
    kv_fill: str = "copy",
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> EarlyExitOutput:
    """Generate up to `max_new_tokens` per row of the left-padded `input_ids`.

    `exit_threshold` None means the model's `config.early_exit_threshold` (as `OuroForCausalLM`);
    `temperature` 0 is greedy decoding, else sampling with nucleus `top_p`. A row stops after
    emitting one of `stop_token_ids`; its later positions hold `pad_token_id`.
    """
    if kv_fill not in KV_FILLS:
        raise ValueError(f"kv_fill {kv_fill!r} not in {KV_FILLS}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = model.config
    steps = total_ut_steps or config.total_ut_steps
    threshold = config.early_exit_threshold if exit_threshold is None else exit_threshold
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)

    prefill = model(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    total_ut_steps=steps, logits_to_keep=1, exit_threshold=threshold)
    cache = ExitKVCache.from_prefill(prefill.past_key_values)
    stops = torch.tensor(stop_token_ids, dtype=torch.long, device=input_ids.device)
    new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    step_counts = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=input_ids.device)
    new_tokens[:, 0] = _next_token(prefill.logits[:, -1], temperature, top_p, generator)
    step_counts[:, 0] = steps
    running = ~torch.isin(new_tokens[:, 0], stops)

    for i in range(1, max_new_tokens):
        if not running.any():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        rows = running.nonzero().squeeze(1)
        logits, used = _decode_position(model, cache, new_tokens[rows, i - 1], rows, attention_mask, steps,
                                        threshold, kv_fill)
        new_tokens[rows, i] = _next_token(logits, temperature, top_p, generator)
        step_counts[rows, i] = used
        running[rows] = ~torch.isin(new_tokens[rows, i], stops)

    width = int((step_counts > 0).any(0).sum())  # positions produced by at least one row
    new_tokens, step_counts = new_tokens[:, :width], step_counts[:, :width]
    return EarlyExitOutput(torch.cat([input_ids, new_tokens], dim=-1), new_tokens, step_counts, cache)


def _decode_position(model, cache: ExitKVCache, tokens, rows, attention_mask, steps: int, threshold: float,
                     kv_fill: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token for each of `rows`: logits [len(rows), V] and the steps each ran."""
    inner = model.base_model
    batch = attention_mask.shape[0]
    saves_compute = threshold < 1.0
    past_len = cache.get_seq_length()
    embed = inner.get_input_embeddings()
    cos, sin = inner.position_embeddings(attention_mask.sum(-1, keepdim=True) - 1, embed.weight.dtype)

    h = embed(tokens[:, None])
    gates = h.new_zeros(len(rows), steps)  # exit-gate logits; zeros for steps not run leave earlier p_t as they are
    exit_state = h.new_empty(len(rows), h.shape[-1])
    exited = torch.zeros(len(rows), dtype=torch.bool, device=h.device)
    steps_run = torch.zeros(len(rows), dtype=torch.long, device=h.device)
    live = torch.arange(len(rows), device=h.device)  # running subset, as indices into `rows`

    cache.begin_position()
    for step in range(steps):
        if live.numel() == 0:
            break
        batch_rows = rows[live]
        cache.rows = None if len(batch_rows) == batch else batch_rows
        plans = inner.attention_plans(len(batch_rows), 1, past_len, attention_mask[batch_rows], device=h.device)
        h, gate = inner.recurrent_step(h, step, (cos[batch_rows], sin[batch_rows]), plans, cache)
        steps_run[live] = step + 1
        gates[live, step] = gate[:, 0, 0]

        # Exit at the first step whose cumulative exit probability reaches the threshold, with the
        # model's own rule on the gates seen so far (the pdf of steps <= `step` does not depend on later gates).
        reached = threshold_exit_steps(exit_pdf(gates[live]), threshold) == step
        exiting = (reached | (step == steps - 1)) & ~exited[live]
        exit_state[live[exiting]] = h[exiting, 0]
        exited[live[exiting]] = True
        if saves_compute and step < steps - 1 and exiting.any():
            cache.fill_deeper_steps(batch_rows[exiting], step, kv_fill)
            live, h = live[~exiting], h[~exiting]
    cache.end_position()
    return model.get_output_embeddings()(exit_state), steps_run


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Greedy for temperature 0, else nucleus sampling (smallest set of tokens with mass >= top_p)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)
