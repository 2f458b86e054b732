"""The multi-tenant chat workload of `bul bench cluster` (real replicas) and `bul bench routing` (a
simulation of up to 128), one shape for both (`SHAPE`, `MEMORY_TOKENS`).

Tenants each have a system prompt of about 1,000 tokens; how often each is chosen follows a Zipf law
(`SHAPE`: exponent 0, every tenant alike). A session is one user's chat with one tenant: 1 to 3 turns,
each a question of about 48 tokens answered in 32 to 96 tokens, every turn sent with the whole
conversation so far (so its prefix is the previous turn's prompt and answer), after the user has read
the previous answer for 1 to 3 s. Everything is drawn from a seeded generator: the same seed gives the
same workload.

Why this shape: it is the case routing exists for, and the hit rate then measures routing. 13 tenants
of 1,000 tokens are 3.2 times one replica's 4,096-token memory tier: neither replica can hold them
all, and a router that splits them holds half of them on each, 1.6 times its memory (a load-blind
router makes each replica hold all of them, 3.2 times). Tenants equally popular: with a steep Zipf law
the few popular tenants stay cached on every replica whatever the router does. Short chats with a
pause before each turn: a previous turn's prompt holds the system prompt too, so under any router a
turn that lands where its session's last turn ran finds nearly all its prompt; without the pause the
benchmark's closed loop sends it there (the replica that has just answered is the shorter queue), a
property of the benchmark, not of routing, while real users read before they ask again."""

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
    pause_s: tuple[float, float] = (0.0, 0.0)  # a user's pause before each turn after the first
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
    pauses_s: list[float] = field(default_factory=list)  # before each turn after the first
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
                pauses_s=[round(rng.uniform(*shape.pause_s), 2) for _ in range(turns - 1)],
            )
        )
    return out


# `bul bench cluster`'s shape and memory tier, which `bul bench routing` simulates: 13 tenants of about
# 1,000 tokens, 3.2 times one replica's memory tier (at least 3 wanted); every tenant as popular as the
# next; chats of 1 to 3 turns, the user reading the answer for 1 to 3 s before the next question.
SHAPE = WorkloadShape(tenants=13, turns=(1, 3), zipf=0.0, pause_s=(1.0, 3.0))
MEMORY_TOKENS = 4096
