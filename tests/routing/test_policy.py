"""The prefix-aware routing policy, without any cluster: decisions, what is learnt, what reports and
eviction take away, sessions."""

from __future__ import annotations

import random

import pytest

from bulk.routing.policy import PrefixAffinityPolicy, RoutingKey

A, B, C = "a", "b", "c"


def policy(threshold: float = 2, **kwargs) -> PrefixAffinityPolicy:
    p = PrefixAffinityPolicy(threshold, rng=random.Random(0), **kwargs)
    p.set_replicas([A, B, C])
    return p


def chain(*blocks: int) -> RoutingKey:
    return RoutingKey(tuple(blocks))


def test_the_longest_cached_prefix_wins():
    p = policy()
    p.report(A, frozenset({1, 2}), taken_at=10.0)
    p.report(B, frozenset({1, 2, 3}), taken_at=10.0)
    decision = p.choose([A, B, C], chain(1, 2, 3, 4), {A: 0, B: 0, C: 0})
    assert decision.reason == "prefix" and decision.preferred == B and decision.matched_blocks == 3
    # The fallback rank is a power-of-two pair, for when the preferred replica is full.
    assert len(decision.ranks) == 2 and len(decision.ranks[1]) == 2


def test_a_start_every_prompt_shares_attracts_nothing():
    # Every prompt starts with the chat template's header (block 1): a replica that served anything
    # holds it. A match of 1 block in 20 is under 10 %: spread by load, not to that replica.
    p = policy()
    p.report(A, frozenset({1, 2, 3}), taken_at=10.0)
    request = chain(1, *range(100, 119))
    decision = p.choose([A, B], request, {A: 0, B: 0})
    assert decision.reason == "spread" and decision.matched_blocks == 1
    assert p.choose([A, B], chain(1, 2), {}).reason == "prefix"  # half of a short chain does count
    greedy = PrefixAffinityPolicy(min_match_ratio=0.0)
    greedy.report(A, frozenset({1}), taken_at=10.0)
    assert greedy.choose([A, B], request, {A: 0, B: 0}).preferred == A  # what the ratio prevents


def test_a_prefix_counts_only_up_to_its_first_missing_block():
    p = policy()
    p.report(A, frozenset({1, 3, 4}), taken_at=10.0)  # block 2 missing: only block 1 is usable
    p.report(B, frozenset({1, 2}), taken_at=10.0)
    assert p.choose([A, B], chain(1, 2, 3, 4), {}).preferred == B


def test_equal_prefixes_go_to_the_shorter_queue():
    p = policy()
    for replica in (A, B):
        p.report(replica, frozenset({1, 2}), taken_at=10.0)
    for _ in range(20):
        assert p.choose([A, B], chain(1, 2), {A: 2, B: 1}).preferred == B


def test_load_wins_past_the_threshold():
    p = policy(threshold=2)
    p.report(A, frozenset({1, 2}), taken_at=10.0)
    assert p.choose([A, B, C], chain(1, 2), {A: 2, B: 0, C: 0}).reason == "prefix"  # 2 - 0 is not > 2
    decision = p.choose([A, B, C], chain(1, 2), {A: 3, B: 0, C: 0})
    assert decision.reason == "balance" and decision.matched_blocks == 2
    assert len(decision.ranks) == 1 and len(decision.ranks[0]) == 2  # power-of-two choices


def test_no_cached_prefix_anywhere_is_spread_by_power_of_two():
    p = policy()
    seen = set()
    for _ in range(50):
        decision = p.choose([A, B, C], chain(7, 8), {A: 0, B: 0, C: 0})
        assert decision.reason == "spread" and len(decision.ranks[0]) == 2
        seen.add(decision.ranks[0][0])
    assert seen == {A, B, C}
    # Of the two drawn, the shorter queue comes first.
    for _ in range(20):
        first, second = p.choose([A, B], chain(9), {A: 5, B: 1}).ranks[0]
        assert (first, second) == (B, A)


def test_a_request_sent_somewhere_is_learnt_at_once():
    p = policy()
    p.routed(B, "r1", chain(1, 2, 3), now=1.0)
    assert p.choose([A, B, C], chain(1, 2, 3, 4), {}).preferred == B


def test_a_report_replaces_what_was_learnt_before_it():
    p = policy(report_slack_s=0.0)
    p.routed(B, "r1", chain(1, 2), now=1.0)
    p.completed("r1", now=2.0)
    # B's report, taken after the request ended, no longer holds it: evicted meanwhile.
    p.report(B, frozenset(), taken_at=3.0)
    assert p.choose([A, B], chain(1, 2), {}).reason == "spread"


def test_a_report_keeps_what_is_still_running_or_ended_after_it():
    p = policy(report_slack_s=0.0)
    p.routed(B, "running", chain(1, 2), now=1.0)
    p.report(B, frozenset(), taken_at=3.0)
    assert p.choose([A, B], chain(1, 2), {}).preferred == B  # not computed yet when reported
    p.routed(A, "late", chain(5, 6), now=1.0)
    p.completed("late", now=4.0)
    p.report(A, frozenset(), taken_at=3.5)  # a report older than the request's end
    assert p.choose([A, B], chain(5, 6), {}).preferred == A


def test_an_older_report_delivered_late_is_ignored():
    p = policy()
    p.report(A, frozenset({1}), taken_at=5.0)
    p.report(A, frozenset(), taken_at=4.0)
    assert p.choose([A, B], chain(1), {}).preferred == A


def test_what_is_learnt_is_bounded_by_the_replicas_capacity():
    p = policy()
    p.report(A, frozenset(), taken_at=0.0, capacity_blocks=4)
    p.routed(A, "r1", chain(1, 2, 3), now=1.0)
    p.routed(A, "r2", chain(10, 11, 12), now=2.0)
    # Four blocks fit: the oldest learnt ones (1, 2) are gone, as the replica's LRU would drop them.
    assert p.view(A).matched((1, 2, 3)) == 0
    assert p.view(A).matched((10, 11, 12)) == 3


def test_sessions_stay_with_their_replica_while_it_is_up():
    p = policy(threshold=0)
    key = RoutingKey((1, 2), session="s1", sticky=True)
    p.routed(C, "r1", key, now=1.0)
    p.report(A, frozenset({1, 2, 3}), taken_at=2.0)  # a longer prefix elsewhere does not move it
    decision = p.choose([A, B, C], key, {A: 0, B: 0, C: 9})  # nor does a queue past the threshold
    assert decision.reason == "session" and decision.preferred == C
    # C is gone (not among the candidates): the session goes where its prefix is, and stays there.
    moved = p.choose([A, B], key, {A: 0, B: 0})
    assert moved.reason == "prefix" and moved.preferred == A
    p.routed(A, "r2", key, now=3.0)
    assert p.session_replica("s1") == A


def test_a_remembered_session_that_does_not_bind_routes_by_prefix():
    p = policy()
    opening = RoutingKey((1,), session="chat:x", sticky=False)
    p.routed(C, "r1", opening, now=1.0)
    p.report(A, frozenset({1, 2}), taken_at=2.0)
    assert p.choose([A, B, C], RoutingKey((1, 2), "chat:x", sticky=False), {}).preferred == A
    assert p.choose([A, B, C], RoutingKey((1, 2), "chat:x", sticky=True), {}).preferred == C


def test_replicas_that_leave_are_forgotten():
    p = policy()
    p.report(A, frozenset({1}), taken_at=1.0)
    p.set_replicas([B, C])
    assert A not in p.views
    assert p.choose([B, C], chain(1), {}).reason == "spread"


def test_the_settings_are_checked():
    with pytest.raises(ValueError):
        PrefixAffinityPolicy(-1)
    with pytest.raises(ValueError):
        PrefixAffinityPolicy(min_match_ratio=1.5)
