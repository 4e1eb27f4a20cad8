"""Lookahead decoding as a transformers `custom_generate` decoding loop.

    model.generate(input_ids, custom_generate=lookahead_generate, lookahead_config=LookaheadConfig(...))

transformers prepares the generation config, logits processors and stopping criteria (max length, EOS, max time,
the caller's `stopping_criteria`) and streams the prompt, then hands the loop to this function.

What transformers (5.17-5.24) does not hand on to a `custom_generate` callable: `tokenizer` (it is popped from the
arguments and dropped), `streamer` after the prompt, and `assistant_model`. Without the tokenizer, transformers cannot
build its stop-string criterion, so `stop_strings` is taken here and refused with the way round it: a
`StopStringCriteria` in `stopping_criteria`, which stops exactly where `stop_strings` would.
"""

from __future__ import annotations

import torch
from transformers import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .config import LookaheadConfig
from .decoding import batch_sequences, decode, eos_set, pad_token, prompts_from
from .sampling import ProcessedGreedyVerifier, SamplingVerifier, seeded_generator

# Generation options this loop cannot honour: name -> (the values that leave it off, what it asks for). Refused
# rather than ignored, so that nobody gets greedy output while asking for something else.
UNSUPPORTED_OPTIONS = {
    "num_beams": ((None, 1), "beam search"),
    "num_beam_groups": ((None, 1), "group beam search"),
    "num_return_sequences": ((None, 1), "several sequences per prompt"),
    "penalty_alpha": ((None, 0, 0.0), "contrastive search"),
    "constraints": ((None,), "constrained beam search"),
    "force_words_ids": ((None,), "constrained beam search"),
    "prompt_lookup_num_tokens": ((None,), "assisted generation"),
    "assistant_early_exit": ((None,), "assisted generation"),
    "use_mtp": ((None, False), "assisted generation"),
    "dola_layers": ((None,), "DoLa decoding"),
    "output_scores": ((None, False), "per-step scores"),
    "output_logits": ((None, False), "per-step logits"),
    "output_attentions": ((None, False), "attention weights"),
    "output_hidden_states": ((None, False), "hidden states"),
}


def check_generation_config(generation_config) -> None:
    """ValueError naming every option set in `generation_config` that lookahead decoding cannot honour."""
    refused = []
    for name, (off, what) in UNSUPPORTED_OPTIONS.items():
        value = getattr(generation_config, name, None)
        if value not in off:
            refused.append(f"{name}={value!r} ({what})")
    if refused:
        raise ValueError(
            f"model.generate(custom_generate=lookahead_generate) does not support {', '.join(refused)}: lookahead "
            "decoding returns one sequence per prompt, greedy or sampled, and no scores"
        )


def criteria_left(stopping_criteria, max_length: int, eos_ids: set[int]) -> StoppingCriteriaList | None:
    """The stopping criteria that the rows' budget (up to `max_length` tokens, prompt included) and their
    end-of-sequence ids `eos_ids` do not already apply, or None if none is left. transformers always adds a
    `MaxLengthCriteria` and an `EosTokenCriteria`; handed on, they would give every row Python after every token
    (`state.Emitter`) and keep the next step from being launched before this one is read."""
    left = [criterion for criterion in stopping_criteria or ()
            if not (isinstance(criterion, MaxLengthCriteria) and criterion.max_length >= max_length)
            and not (isinstance(criterion, EosTokenCriteria) and set(criterion.eos_token_id.flatten().tolist()) <= eos_ids)]
    return StoppingCriteriaList(left) if left else None


def lookahead_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    lookahead_config: LookaheadConfig | str | None = None,
    lookahead_source=None,
    stop_strings=None,
    **model_kwargs,
):
    """Decoding loop for `model.generate(custom_generate=lookahead_generate)`: greedy or sampling, one prompt or a
    left-padded batch (each row decoded on its own and padded with the pad token after it stops).

    `logits_processor` is transformers' own list (with the temperature/top-k/top-p warpers when sampling), applied
    at every verified position; sampling draws from a generator seeded by torch's global RNG. With
    `return_dict_in_generate=True` the result is a GenerateDecoderOnlyOutput holding `sequences` only.
    `lookahead_source` is `ld.generate`'s `source` (default: the library's sources).
    """
    if stop_strings is not None:
        raise ValueError(
            "stop_strings: transformers does not pass `tokenizer` on to a custom_generate function, so the stop "
            "strings cannot be matched; pass stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, "
            "stop_strings)]) instead, which stops at the same token"
        )
    check_generation_config(generation_config)
    if generation_config.do_sample:
        verifier = SamplingVerifier(seeded_generator(model.device), logits_processor=logits_processor)
    else:
        verifier = ProcessedGreedyVerifier(logits_processor) if len(logits_processor) > 0 else None
    prompts = prompts_from(input_ids, model_kwargs.get("attention_mask"))  # a left-padded batch: one list per row
    config = lookahead_config if lookahead_config is not None else "auto"  # calibrated shapes, as ld.generate
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    eos_ids = eos_set(model, generation_config.eos_token_id)
    results, _, _ = decode(
        model,
        prompts,
        max_new_tokens,
        config,
        streamer=streamer,
        stopping_criteria=criteria_left(stopping_criteria, generation_config.max_length, eos_ids),
        eos_token_id=list(eos_ids),
        source=lookahead_source,
        stream_prompt=False,  # transformers already streamed it
        verifier=verifier,
    )
    pad = generation_config.pad_token_id
    sequences = batch_sequences(input_ids, prompts, results, pad_token(model) if pad is None else pad, input_ids.device)
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences
