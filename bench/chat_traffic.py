"""Chat traffic for `bul bench serve` and `bul bench peers`: requests as conversations (`messages`,
sent to `/v1/chat/completions`; each server applies its model's own chat template), built from the
licence texts of `bench.quality.load_corpus` so that the real model reads English.

  distinct   a different question of about 200 tokens each (a passage and a question on it, behind
             a unique first line), short answers or long ones (forced to their length)
  shared     a few system prompts of about 1,000 tokens and many questions, each after one of them in
             turn (no two requests in a row share their system prompt when there are several)
  chat       multi-turn chats: each turn sends the whole conversation so far (scripted earlier
             answers, so every server sees the same text) and a new question
  cold       one fresh prompt of about 1,000 tokens and a 1-token answer: its TTFT is the prefill

Everything here is deterministic: the same options give the same requests, in the same order."""

from __future__ import annotations

from bench.serve_load import Request, Turns

# Characters of the licence texts per SmolLM2 token, about (4,200 characters: ~1,000 tokens).
CHARS_PER_TOKEN = 4.2
TOPICS = (
    "copying the program",
    "distributing modified versions",
    "the source code",
    "patents",
    "warranty",
    "termination",
    "linking with other programs",
    "the license notice",
)
ASKS = ("What does this license say about {}?", "Summarize the rules on {}.", "Can I ignore the part on {}?")
PASSAGE_ASKS = (
    "What does this passage say about {}?",
    "Explain this passage in one sentence, with regard to {}.",
    "Is anything in this passage about {}? Answer briefly.",
)
CHAT_QUESTIONS = (
    "I want to start a small bakery. What should I do first?",
    "How much money do I need to start?",
    "How do I find my first customers?",
    "What should I put on the menu?",
    "How many people should I hire?",
    "How do I set my prices?",
)
CHAT_ANSWER = (
    "Start by writing a short plan: what you will sell, to whom, and where. Then check the local "
    "rules for food businesses, estimate your costs, and test a few recipes on friends."
)


def chars_for(tokens: int) -> int:
    return int(tokens * CHARS_PER_TOKEN)


def passage(text: str, start: int, chars: int) -> str:
    """About `chars` characters of `text` from the word boundary at or after `start` (wrapping
    around), whitespace collapsed."""
    start %= max(len(text) - chars, 1)
    if start:
        start = text.find(" ", start) + 1
    return " ".join(text[start : start + chars].split())


def passages(text: str, count: int, chars: int, offset: int) -> list[str]:
    """`count` passages of `text`, `chars` characters each, spread over it from `offset`."""
    step = max(chars, (len(text) - chars - offset) // max(count, 1))
    return [passage(text, offset + i * step, chars) for i in range(count)]


def question(text: str, index: int, tokens: int = 200) -> str:
    """Distinct question `index`: its number first (so no two share more than the chat template's
    head), a passage of the text, and a question on it; about `tokens` tokens."""
    # A prime stride spreads the passages over the text; 200-token passages overlap only far apart.
    start = 1000 + index * 7919
    ask = PASSAGE_ASKS[index % len(PASSAGE_ASKS)].format(TOPICS[index % len(TOPICS)])
    body = passage(text, start, max(chars_for(tokens) - 120, 40))
    return f"Question {index + 1}. Read this passage:\n\n{body}\n\n{ask}"


def distinct_request(
    text: str, index: int, max_tokens: int, tokens: int = 200, forced: bool = False
) -> Request:
    return Request(max_tokens, messages=(("user", question(text, index, tokens)),), forced=forced)


def distinct_requests(
    text: str, count: int, max_tokens: int, salt: int, tokens: int = 200, forced: bool = False
) -> list[Request]:
    """`count` distinct questions; `salt` keeps one workload's questions apart from another's."""
    return [distinct_request(text, salt * 1000 + i, max_tokens, tokens, forced) for i in range(count)]


def system_prompts(text: str, count: int, tokens: int = 1000) -> list[str]:
    return [
        "Answer questions about this license text.\n\n" + p
        for p in passages(text, count, chars_for(tokens), 0)
    ]


def shared_request(systems: list[str], index: int, max_tokens: int) -> Request:
    """Question `index` after system prompt `index % len(systems)`."""
    ask = ASKS[index % len(ASKS)].format(TOPICS[(index // len(ASKS)) % len(TOPICS)])
    system = systems[index % len(systems)]
    return Request(max_tokens, messages=(("system", system), ("user", f"{ask} (question {index + 1})")))


def shared_prefix_requests(
    text: str, count: int, questions: int, max_tokens: int, tokens: int = 1000
) -> list[Request]:
    """`questions` questions, each after system prompt i % `count` (interleaved)."""
    systems = system_prompts(text, count, tokens)
    return [shared_request(systems, i, max_tokens) for i in range(questions)]


def chat_turn(chat: int, turn: int, max_tokens: int) -> Request:
    """Turn `turn` (from 0) of chat `chat`: its system line, the earlier turns with their scripted
    answers, and a new question."""
    messages: list[tuple[str, str]] = [
        ("system", f"You are a helpful assistant for small businesses (chat {chat + 1}).")
    ]
    for t in range(turn + 1):
        messages.append(("user", CHAT_QUESTIONS[(chat + t) % len(CHAT_QUESTIONS)]))
        if t < turn:
            messages.append(("assistant", CHAT_ANSWER))
    return Request(max_tokens, messages=tuple(messages))


def multi_turn_requests(chats: int, turns: int, max_tokens: int) -> list[Request]:
    """Turn t of every chat, then turn t + 1 of every chat...: each request holds its chat so far."""
    return [chat_turn(chat, turn, max_tokens) for turn in range(turns) for chat in range(chats)]


def cold_request(text: str, index: int, tokens: int = 1000) -> Request:
    """A fresh prompt of about `tokens` tokens (a unique first line, then the text), one token of
    answer: the server's TTFT is its prefill (plus one step and the HTTP round trip)."""
    body = passage(text, 20_000 + index * 15_013, chars_for(tokens) - 60)
    messages: Turns = (
        ("system", f"Cold prompt {index + 1}: read this text.\n\n{body}"),
        ("user", "Summarize it."),
    )
    return Request(1, messages=messages)
