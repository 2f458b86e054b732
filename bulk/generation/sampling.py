"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling; the
tokens a request may not choose yet (`suppress_tokens`, for `min_tokens`); the per-request changes to
a row's logits (`process_logits`: logit bias, repetition, presence and frequency penalties); and the
log-probabilities of the chosen token and its best alternatives (`token_logprobs`).

Logprobs are those of the distribution a token is chosen from *before* temperature and top-p: the
row's logits after logit bias, penalties and `min_tokens` suppression, normalised by a float32
log-softmax. So a greedy row's token is always the most likely one shown, the numbers do not depend on
the temperature, and a forced or banned token shows as such (vLLM's default, `raw_logprobs`, reports
the model's distribution before any of these; OpenAI does not say)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from bulk.generation.structured import Constraint

MIN_TEMPERATURE = 1e-6
# OpenAI's limits: at most 20 alternatives per token; penalties in [-2, 2]; a bias in [-100, 100].
MAX_LOGPROBS = 20
# JSON has no -inf: a token that cannot be chosen (suppressed) is shown with OpenAI's floor instead.
LOGPROB_FLOOR = -9999.0


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
    # How many alternatives to report with each token's log-probability; None: no logprobs at all
    # (nothing computed), 0: the chosen token's only.
    logprobs: int | None = None
    # OpenAI's penalties over the answer's tokens: `frequency_penalty` times a token's count plus
    # `presence_penalty` once it occurs, subtracted from its logit.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Hugging Face's (and vLLM's), over the prompt's and the answer's tokens: a positive logit divided
    # by it, a negative one multiplied; 1 changes nothing.
    repetition_penalty: float = 1.0
    # (token id, bias) pairs, ids ascending: added to the token's logit.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's: tokens that end the answer as the end of sequence does (and are not part of it).
    stop_token_ids: tuple[int, ...] = ()
    # A grammar every token obeys (`bulk.generation.structured`): a JSON schema, a regex, ...
    constraint: Constraint | None = None
    # Computed: whether `process_logits` has anything to do for this request (rows that ask for
    # nothing pay one attribute read).
    processes_logits: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        changes = (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or bool(self.logit_bias)
        )
        object.__setattr__(self, "processes_logits", changes)

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


def process_logits(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """Apply `params`' logit bias and penalties to `logits` (vocab,), in place (as `suppress_tokens`:
    the row is what the token is chosen from, greedy or sampled, and what its logprobs are computed
    from); returns `logits`. Computed in float32 and written back in the row's dtype. Ids beyond the
    logits are skipped (the engine refuses them at intake; this only keeps a step from failing)."""
    vocab = logits.shape[-1]
    with torch.inference_mode():
        work = logits.float()  # the row itself when it is float32
        if params.logit_bias:
            ids = [i for i, _ in params.logit_bias if i < vocab]
            bias = [b for i, b in params.logit_bias if i < vocab]
            if ids:
                work.index_add_(0, torch.tensor(ids), torch.tensor(bias, dtype=torch.float32))
        if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
            seen = torch.tensor(sorted({*prompt_ids, *output_ids}))
            seen = seen[seen < vocab]
            values = work[seen]
            penalty = params.repetition_penalty
            work[seen] = torch.where(values > 0, values / penalty, values * penalty)
        if (params.presence_penalty or params.frequency_penalty) and output_ids:
            ids, counts = torch.unique(torch.tensor(output_ids), return_counts=True)
            keep = ids < vocab
            ids, counts = ids[keep], counts[keep].float()
            work.index_add_(0, ids, -(params.frequency_penalty * counts + params.presence_penalty))
        if work.data_ptr() != logits.data_ptr():
            logits.copy_(work)
    return logits


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under `logits` (vocab,) (a float32 log-softmax) and the `top`
    most likely tokens as (id, logprob), most likely first; of equally likely ones, `token` first, so a
    greedy row's token leads its list as the argmax chose it. -inf is shown as `LOGPROB_FLOOR`."""
    with torch.inference_mode():
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = _finite(float(logprobs[token]))
        if top <= 0:
            return chosen, []
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
    alternatives = [(int(i), _finite(float(v))) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    ties = [a for a in alternatives if a[1] == chosen]
    if ties and ties[0][0] != token and any(i == token for i, _ in ties):
        alternatives.remove((token, chosen))
        alternatives.insert(alternatives.index(ties[0]), (token, chosen))
    return chosen, alternatives


def _finite(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR
