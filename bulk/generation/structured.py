"""Structured outputs: a request's constraint (a JSON schema, any JSON object, a regular expression, a
Lark or GBNF grammar, a choice among strings) kept as a grammar that every token of the answer obeys.

The grammar engine is llguidance (guidance's Rust engine; `docs/structured-outputs.md` says why it
and not xgrammar). A constraint is checked when the request is parsed (`parse_constraint`: an unknown
JSON-schema keyword or a bad regex is an `InvalidRequestError` naming the field, never a failure in
the step), compiled against the tokenizer once per (vocabulary, grammar) and kept in a bounded LRU
(`GrammarCache`), compiled on a thread of its own (`compile_async`) so that a slow grammar never
stalls the batch, and each request gets its own copy of the compiled matcher.

In the step, a constrained row's logits get its matcher's mask (`RowGrammar.mask`, applied by
`apply_bitmask` or the native kernel): every token the
grammar does not allow next is set to -inf, for greedy and sampled rows alike; then the sampled
token advances the matcher (`Sequence.append`), and a grammar that is complete ends the answer.
Rows without a constraint are not touched."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from bulk.errors import InvalidRequestError
from bulk.models.tokenizer import Tokenizer, grammar_vocabulary

log = logging.getLogger(__name__)

FIELD = "structured_outputs"
# The kinds of constraint, vLLM's names (`structured_outputs: {"json": schema}` and its `guided_*`).
KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 256 * 1024  # a schema or grammar larger than this is refused, not compiled
MAX_CHOICES = 1024
# JSON as OpenAI's and `json.dumps`'s defaults write it, and no other whitespace: a small model given
# free whitespace can fill its whole answer with newlines inside a valid object.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """One request's constraint. `spec` is its canonical text (a schema as compact JSON, the
    regex, the grammar, the choices as a JSON list; "" for any JSON object), so that equal
    constraints are equal keys of the grammar cache and of the response cache."""

    kind: str
    spec: str

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint."""
        import llguidance

        matcher = llguidance.LLMatcher
        if self.kind == "json":
            return matcher.grammar_from_json_schema(self.spec, overrides=_JSON_LAYOUT)  # type: ignore[arg-type]
        if self.kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_LAYOUT)  # type: ignore[arg-type]
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            # Lark string literals take JSON's escapes; each choice is one alternative of `start`.
            options = json.loads(self.spec)
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
        from llguidance.gbnf_to_lark import any_to_lark

        return matcher.grammar_from_lark(any_to_lark(self.spec))

    def to_payload(self) -> dict[str, Any]:
        """The request field's value that parses back to this constraint."""
        if self.kind in ("json", "choice"):
            return {self.kind: json.loads(self.spec)}
        return {self.kind: True if self.kind == "json_object" else self.spec}


def parse_constraint(value: Any, field: str = FIELD) -> Constraint | None:
    """The constraint of a request's `structured_outputs` object (exactly one of `KINDS`), checked:
    a bad value or a grammar llguidance cannot compile raises `InvalidRequestError(field)` with the
    library's message (which names the unsupported keyword). None when there is none."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequestError(field, f"must be an object with one of: {', '.join(KINDS)}")
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    unknown = sorted(str(k) for k in given if k not in KINDS)
    if unknown:
        raise InvalidRequestError(f"{field}.{unknown[0]}", f"unknown constraint (one of: {', '.join(KINDS)})")
    if len(given) != 1:
        raise InvalidRequestError(field, f"give exactly one of: {', '.join(KINDS)}")
    ((kind, spec),) = given.items()
    constraint = Constraint(kind, _canonical(kind, spec, f"{field}.{kind}"))
    _check(constraint, f"{field}.{kind}")
    return constraint


def _canonical(kind: str, spec: Any, field: str) -> str:
    if kind == "json_object":
        if spec is not True:
            raise InvalidRequestError(field, "must be true")
        return ""
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError:
                raise InvalidRequestError(
                    field, "must be a JSON schema (an object, or its JSON text)"
                ) from None
        if not isinstance(spec, Mapping) and not isinstance(spec, bool):
            raise InvalidRequestError(field, "must be a JSON schema (an object, or its JSON text)")
        # Key order kept: a schema's `properties` order is the order the answer writes them in.
        text = json.dumps(spec, separators=(",", ":"), ensure_ascii=False)
    elif kind == "choice":
        if (
            not isinstance(spec, list)
            or not 1 <= len(spec) <= MAX_CHOICES
            or not all(isinstance(s, str) and s for s in spec)
        ):
            raise InvalidRequestError(field, f"must be a list of 1 to {MAX_CHOICES} non-empty strings")
        text = json.dumps(spec, ensure_ascii=False)
    else:  # regex, grammar
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidRequestError(field, "must be a non-empty string")
        text = spec
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidRequestError(field, f"at most {MAX_SPEC_CHARS} characters")
    return text


# Checked constraints: a request repeating a schema is not checked again. Bounded, as the grammar cache.
_checked: OrderedDict[Constraint, str] = OrderedDict()
_checked_lock = threading.Lock()
CHECKED_ENTRIES = 1024


def _check(constraint: Constraint, field: str) -> None:
    with _checked_lock:
        error = _checked.get(constraint)
        if error is not None:
            _checked.move_to_end(constraint)
    if error is None:
        import llguidance

        try:
            error = llguidance.LLMatcher.validate_grammar(constraint.grammar())
        except Exception as exc:  # the library's converters raise on some malformed input
            error = str(exc) or type(exc).__name__
        with _checked_lock:
            _checked[constraint] = error
            while len(_checked) > CHECKED_ENTRIES:
                _checked.popitem(last=False)
    if error:
        raise InvalidRequestError(field, f"cannot be served: {error.strip()}")


class RowGrammar:
    """One request's matcher: the mask of the tokens allowed next, advanced by each token chosen."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._words = (vocab_size + 31) // 32

    def mask(self) -> torch.Tensor:
        """The tokens the grammar allows next: (words,) int32, bit i of word w allowing token
        32 * w + i (llguidance's layout), for `apply_bitmask` or the native kernel."""
        return masks([self])[0]

    def advance(self, token: int) -> bool:
        """Take the chosen token; False when the grammar does not allow it (then it is in error)."""
        return bool(self._matcher.consume_token(token))

    def forced(self) -> list[int]:
        """The tokens the grammar allows as the only continuation from here (llguidance's
        fast-forward tokens; empty when the next token is a choice)."""
        return list(self._matcher.compute_ff_tokens())

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more: the answer is over."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self._matcher.get_error())


_BITS = torch.arange(32, dtype=torch.int32)


def masks(grammars: Sequence[RowGrammar]) -> torch.Tensor:
    """Each grammar's `mask`, (rows, words) int32, for the rows of one step (about 60 µs a row for
    a JSON schema's string). One after another on the model thread: llguidance's parallel executor
    was measured slower here (1.6x at 16 rows on 2 cores), its threads contending with torch's."""
    words = grammars[0]._words
    out = torch.empty((len(grammars), words), dtype=torch.int32)
    for index, grammar in enumerate(grammars):
        grammar._matcher.unsafe_compute_mask_ptr(out[index].data_ptr(), words * 4)
    return out


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set every logit (vocab,) of a token `mask` (`RowGrammar.mask`) does not allow to -inf, in
    place (the row is what the token is chosen from, and what its logprobs are computed from).
    Logits beyond the mask's tokens (a model's padded embedding rows) are never allowed. ATen's way,
    about 0.2 ms a row; the model runner uses the native kernel where it is built
    (`bulk.models.native.apply_token_bitmask`), which gives the same row."""
    # (words, 32) -> (words * 32,): one bool per token id.
    allowed = ((mask.unsqueeze(-1) >> _BITS) & 1).view(-1).bool()
    with torch.inference_mode():
        if logits.shape[-1] > allowed.numel():
            logits[allowed.numel() :] = float("-inf")
        width = min(logits.shape[-1], allowed.numel())
        logits[:width].masked_fill_(~allowed[:width], float("-inf"))


class GrammarCache:
    """Compiled grammars by (vocabulary, constraint), least recently used evicted beyond `entries`.
    Each `row_grammar` call returns a fresh copy of the compiled matcher: a request's matcher
    advances with its own tokens. Thread-safe: compiling (on `compile_async`'s thread) and copying
    (there too) may run beside the model thread."""

    def __init__(self, entries: int = 256) -> None:
        self.entries = entries
        # (id of the vocabulary, constraint) -> (the vocabulary, its compiled matcher): the entry
        # holds the vocabulary, so that its id cannot be another vocabulary's while the entry lives.
        self._compiled: OrderedDict[tuple[int, Constraint], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._compiled)

    def cached(self, constraint: Constraint, vocabulary: Any) -> RowGrammar | None:
        """A fresh `RowGrammar` when the grammar is compiled already (a copy: microseconds, fit for
        the model thread), else None."""
        key = (id(vocabulary), constraint)
        with self._lock:
            entry = self._compiled.get(key)
            if entry is None:
                return None
            self._compiled.move_to_end(key)
            self.hits += 1
        return RowGrammar(entry[1].deep_copy(), vocabulary.vocab_size)

    def row_grammar(self, constraint: Constraint, vocabulary: Any) -> RowGrammar:
        """A fresh `RowGrammar`, compiled on a miss (milliseconds, up to a second for a huge
        grammar: off the model thread, `compile_async`)."""
        import llguidance

        ready = self.cached(constraint, vocabulary)
        if ready is not None:
            return ready
        compiled = llguidance.LLMatcher(vocabulary, constraint.grammar(), log_level=0)
        if compiled.is_error():
            raise InvalidRequestError(
                f"{FIELD}.{constraint.kind}", f"cannot be served: {compiled.get_error()}"
            )
        with self._lock:
            self.misses += 1
            self._compiled[(id(vocabulary), constraint)] = (vocabulary, compiled)
            while len(self._compiled) > self.entries:
                self._compiled.popitem(last=False)
        return RowGrammar(compiled.deep_copy(), vocabulary.vocab_size)


GRAMMARS = GrammarCache()
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def ready_grammar(constraint: Constraint, tokenizer: Tokenizer) -> RowGrammar | None:
    """`constraint`'s `RowGrammar` at once when its grammar is compiled for `tokenizer` already (the
    usual case: applications send the same few schemas), else None: then `compile_async`."""
    vocabulary = getattr(tokenizer, "_grammar_vocabulary", None)
    return None if vocabulary is None else GRAMMARS.cached(constraint, vocabulary)


def compile_async(constraint: Constraint, tokenizer: Tokenizer) -> Future[RowGrammar]:
    """A fresh `RowGrammar` for `constraint` over `tokenizer`'s vocabulary, compiled on the grammar
    thread (one per process: compiling is rare, and llguidance releases the GIL while it builds a
    grammar; the vocabulary itself is built there too, once per tokenizer). The future raises
    `InvalidRequestError` for a grammar that cannot be compiled against this vocabulary."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bul-grammar")
    return _executor.submit(lambda: GRAMMARS.row_grammar(constraint, grammar_vocabulary(tokenizer)))
