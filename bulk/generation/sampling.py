"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling, and the
tokens a request may not choose yet (`suppress_tokens`, for `min_tokens`)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy: deterministic
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # vLLM's extra fields, with its semantics: the end of sequence does not end the answer (it is kept
    # as an ordinary token); and until `min_tokens` tokens are out it cannot be chosen and no stop
    # string is looked for.
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def deterministic(self) -> bool:
        """Greedy, or sampled from a fixed seed: the same prompt always gives the same text."""
        return self.temperature == 0.0 or self.seed is not None


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0.0:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def suppress_tokens(logits: torch.Tensor, token_ids: Collection[int]) -> torch.Tensor:
    """Set `logits[token_ids]` (logits: (vocab,)) to -inf, so that neither greedy decoding nor sampling
    can choose them; returns `logits`. In place: the caller's row is what the token is sampled from
    (and what a logits observer is shown). Ids beyond the logits are skipped: a generation config may
    name an end-of-turn id outside the model's vocabulary, which must not fail the step."""
    index = [i for i in token_ids if 0 <= i < logits.shape[-1]]
    if index:
        # The model's logits are inference tensors, which may only be changed in place in this mode.
        with torch.inference_mode():
            logits.index_fill_(-1, torch.tensor(index, device=logits.device), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: (vocab,). Sampling runs on the CPU in float32 so a seed gives the same tokens on any
    device the model runs on."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    # Below ~1e-38 a float32 temperature is 0, and tiny ones overflow the scaled logits: NaN
    # probabilities. A temperature this small is greedy in effect.
    temperature = max(params.temperature, MIN_TEMPERATURE)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        # Stated, not left to the comparison: a top_p below float32's smallest number reads as 0.
        outside[0] = False
        sorted_probs[outside] = 0.0
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
