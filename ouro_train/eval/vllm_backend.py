"""`--backend vllm`: benchmark completions from vLLM (not a dependency; imported only when asked for).

vLLM's Ouro runs every recurrent step for every token (it has no adaptive exit), so it serves the
fixed-T settings only; T is set per engine through `hf_overrides`. Each completion gets its own
sampling seed (group seed + its index) so the N samples of a problem differ.
"""

from __future__ import annotations

from pathlib import Path

from ouro_train.generation.chat import THINK_OPEN, Completion, GenerationSettings, prompt_ids, stop_token_ids

_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}


def vllm_complete(model_dir: Path, tokenizer, dtype: str = "auto"):
    from vllm import LLM, SamplingParams

    engines: dict[int, LLM] = {}

    def complete(conversations: list[list[dict]], settings: GenerationSettings, seed: int) -> list[Completion]:
        if settings.exit_threshold is not None and settings.exit_threshold < 1.0:
            raise ValueError("vLLM has no adaptive exit: use --backend ours for --thresholds")
        steps = settings.ut_steps
        if steps not in engines:
            engines.clear()  # one engine (one T) on the GPU at a time
            engines[steps] = LLM(model=str(model_dir), dtype=_DTYPES[dtype], hf_overrides={"total_ut_steps": steps})
        prompts = [{"prompt_token_ids": prompt_ids(tokenizer, c, settings.think)} for c in conversations]
        params = [SamplingParams(temperature=settings.temperature, top_p=settings.top_p, seed=seed + i,
                                 max_tokens=settings.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer),
                                 skip_special_tokens=False) for i in range(len(prompts))]
        completions = []
        for request in engines[steps].generate(prompts, params, use_tqdm=False):
            out = request.outputs[0]
            completions.append(Completion(text=(THINK_OPEN if settings.think else "") + out.text,
                                          num_tokens=len(out.token_ids), mean_steps=float(steps),
                                          stopped=out.finish_reason == "stop"))
        return completions

    return complete
