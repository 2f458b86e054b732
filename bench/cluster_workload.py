"""The multi-tenant chat workload of `bul bench cluster` (real replicas) and `bul bench routing` (a
simulation of up to 128), one shape for both.

Tenants each have a system prompt of about 1,000 tokens; their popularity follows a mild Zipf law
(exponent 0.5: the first of 8 tenants gets 3 times the traffic of the last). A session is one user's
chat with one tenant: 1 to 4 turns, each a question of about 48 tokens answered in 32 to 96 tokens,
every turn sent with the whole conversation so far (so its prefix is the previous turn's prompt and
answer). Everything is drawn from a seeded generator: the same seed gives the same workload.

`bul bench cluster` runs it with 14 tenants (`bench.cluster.SHAPE`): about 14,000 tokens of system
prompts, 3.5 times one replica's 4,096-token memory tier, so that where a prefix is routed decides
whether it is still in memory; `bul bench routing` scales the tenants with the replicas."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_VOCABULARY = (
    "order delivery bread flour oven price weekend opening hours invoice customer supplier recipe "
    "sourdough croissant rye spelt butter sugar yeast dough shelf storage discount loyalty card event "
    "catering wedding birthday cake allergy gluten vegan organic local market staff shift schedule "
    "holiday refund complaint review website social campaign budget season summer winter spring autumn"
)
WORDS = tuple(_VOCABULARY.split(" "))


@dataclass(frozen=True)
class WorkloadShape:
    tenants: int = 8
    system_tokens: int = 1000
    question_tokens: int = 48
    answer_tokens: tuple[int, int] = (32, 96)
    turns: tuple[int, int] = (1, 4)
    zipf: float = 0.5
    seed: int = 7

    def popularity(self) -> list[float]:
        weights = [1.0 / (rank + 1) ** self.zipf for rank in range(self.tenants)]
        total = sum(weights)
        return [w / total for w in weights]


@dataclass
class Session:
    tenant: int
    questions: list[str]
    answer_tokens: list[int]
    turn: int = 0
    history: list[dict[str, str]] = field(default_factory=list)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def system_prompts(shape: WorkloadShape, tokens_per_word: float = 1.0) -> list[str]:
    """One system prompt per tenant, about `shape.system_tokens` tokens long (`tokens_per_word`: how
    many tokens a word of `WORDS` takes with the model's tokenizer, about 7 with a byte tokenizer)."""
    rng = random.Random(shape.seed)
    n_words = max(1, int(shape.system_tokens / tokens_per_word))
    return [
        f"You are the assistant of tenant {t}, a bakery. House rules: " + words(rng, n_words)
        for t in range(shape.tenants)
    ]


def sessions(shape: WorkloadShape, count: int, tokens_per_word: float = 1.0, seed: int = 0) -> list[Session]:
    rng = random.Random(shape.seed * 1000 + seed)
    popularity = shape.popularity()
    q_words = max(1, int(shape.question_tokens / tokens_per_word))
    out = []
    for index in range(count):
        tenant = rng.choices(range(shape.tenants), popularity)[0]
        turns = rng.randint(*shape.turns)
        out.append(
            Session(
                tenant=tenant,
                questions=[f"Question {index}.{t}: " + words(rng, q_words) + "?" for t in range(turns)],
                answer_tokens=[rng.randint(*shape.answer_tokens) for _ in range(turns)],
            )
        )
    return out
