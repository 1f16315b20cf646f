"""The time-aware IP index: reuse by time, grace after release, shared addresses never name a pod."""

import math

import numpy as np

from flowscope.enrich import ipindex
from flowscope.enrich.ipindex import (
    AMBIGUOUS,
    ANSWER_AMBIGUOUS,
    ANSWER_NONE,
    ANSWER_UNCLAIMED,
    ANSWER_VARIES,
    VARIES,
    IpIndex,
    resolve_claims,
)

A, B, C = ("pod", "uid-a"), ("pod", "uid-b"), ("pod", "uid-c")


def owner(index: IpIndex, ip: str, lo: float, hi: float | None = None):
    """The owner during [lo, hi], checked to be the same from the claims and from the cached timeline."""
    hi = lo if hi is None else hi
    answer = resolve_claims(index.claims(ip), lo, hi)
    assert index.timeline(ip).answer(lo, hi) == answer
    return answer


def test_an_address_released_and_taken_again_is_attributed_by_time():
    index = IpIndex(grace=60)
    index.claim("10.0.0.5", A, start=-math.inf)
    index.release("10.0.0.5", A, at=100)
    index.claim("10.0.0.5", B, start=130)
    assert owner(index, "10.0.0.5", 50) == A
    assert owner(index, "10.0.0.5", 120) == A  # released, within the grace, nobody else yet
    assert owner(index, "10.0.0.5", 130) == B  # the new owner cuts the grace short
    assert owner(index, "10.0.0.5", 500) == B
    assert owner(index, "10.0.0.5", 125, 135) is AMBIGUOUS  # a window across the hand-over: no guess


def test_grace_ends_when_nobody_takes_the_address():
    index = IpIndex(grace=60)
    index.claim("10.0.0.5", A, start=0)
    index.release("10.0.0.5", A, at=100)
    assert owner(index, "10.0.0.5", 159.9) == A
    assert owner(index, "10.0.0.5", 160) is None


def test_a_new_owner_starts_no_earlier_than_the_old_one_let_go():
    index = IpIndex(grace=60)
    index.claim("10.0.0.5", A, start=0)
    index.release("10.0.0.5", A, at=100)
    index.claim("10.0.0.5", B, start=90)  # kubelet acknowledged B before A was gone
    assert owner(index, "10.0.0.5", 95) == A
    assert owner(index, "10.0.0.5", 100) == B


def test_a_release_seen_after_the_new_owner_ends_the_old_claim_where_the_new_one_began():
    index = IpIndex(grace=60)
    index.claim("10.0.0.5", A, start=0)
    index.claim("10.0.0.5", B, start=100)  # the watch showed B's IP before A's deletion
    assert owner(index, "10.0.0.5", 110) is AMBIGUOUS  # two live owners
    index.release("10.0.0.5", A, at=120)
    assert owner(index, "10.0.0.5", 110) == B
    assert owner(index, "10.0.0.5", 50) == A


def test_shared_addresses_name_the_node_never_one_of_its_host_network_pods():
    index = IpIndex(grace=60)
    index.claim("192.168.1.10", ("node", "node-a"), start=-math.inf, shared=True, node="node-a")
    index.claim("192.168.1.10", A, start=-math.inf, shared=True, node="node-a")
    index.claim("192.168.1.10", B, start=-math.inf, shared=True, node="node-a")
    assert owner(index, "192.168.1.10", 10) == ("node", "node-a")
    index.claim("192.168.1.11", C, start=-math.inf, shared=True, node="node-b")  # node object not known
    assert owner(index, "192.168.1.11", 10) == ("node", "node-b")


def test_two_live_owners_of_one_address_are_ambiguous():
    index = IpIndex(grace=60)
    index.claim("10.0.0.7", A, start=-math.inf)
    index.claim("10.0.0.7", B, start=-math.inf)
    assert owner(index, "10.0.0.7", 10) is AMBIGUOUS


def test_claiming_again_while_holding_is_a_no_op():
    index = IpIndex(grace=60)
    index.claim("10.0.0.7", A, start=0)
    index.claim("10.0.0.7", A, start=50)
    assert len(index.claims("10.0.0.7")) == 1 and index.claims("10.0.0.7")[0].start == 0


def test_the_timeline_tells_when_one_answer_fits_a_whole_batch():
    index = IpIndex(grace=10)
    index.claim("10.0.0.5", A, start=0)
    index.release("10.0.0.5", A, at=100)
    timeline = index.timeline("10.0.0.5")
    assert timeline.single_answer(20, 80) == A
    assert timeline.single_answer(105, 115) is VARIES  # the grace ends at 110
    assert timeline.single_answer(-5, 5) is VARIES
    assert timeline.single_answer(111, 200) is None
    index.claim("10.0.0.5", B, start=300)
    assert index.timeline("10.0.0.5") is not timeline  # a new claim: rebuilt
    assert index.timeline("10.0.0.5").single_answer(300, 400) == B
    assert index.timeline("10.0.0.99") is None


def test_networks_name_addresses_by_the_most_specific_prefix():
    index = IpIndex(grace=60)
    index.add_network("192.0.2.0/24", ("pod", "corp"))
    index.add_network("192.0.2.128/25", ("pod", "lab"))
    index.add_network("2001:db8::/32", ("pod", "v6"))
    assert index.network_owner("192.0.2.7") == ("pod", "corp")
    assert index.network_owner("192.0.2.200") == ("pod", "lab")
    assert index.network_owner("2001:db8::1") == ("pod", "v6")
    assert index.network_owner("198.51.100.1") is None
    assert index.network_owner("not-an-ip") is None


def test_purge_drops_claims_one_grace_after_their_grace():
    index = IpIndex(grace=10)
    index.claim("10.0.0.5", A, start=0)
    index.release("10.0.0.5", A, at=100)
    index.claim("10.0.0.6", B, start=0)
    assert index.purge(now=119) == 0
    assert index.purge(now=121) == 1
    assert len(index) == 1 and index.claims("10.0.0.5") == ()


NODE_A = ("node", "node-a")
X, Y, N, OUTSIDE = "10.0.0.1", "10.0.0.2", "192.168.1.10", "203.0.113.1"  # N: node-a's, shared


def answers(index: IpIndex, queries: list[tuple[str, float, float, object, object]]) -> None:
    """Checks `resolve` and `lookup` of a batch of (address, lo, hi) against the hand-derived answers."""
    addresses = np.array([q[0] for q in queries], dtype=object)
    lo, hi = np.array([q[1] for q in queries], float), np.array([q[2] for q in queries], float)
    names = {ANSWER_NONE: None, ANSWER_AMBIGUOUS: AMBIGUOUS, ANSWER_UNCLAIMED: "unclaimed", ANSWER_VARIES: "varies"}

    def named(found: np.ndarray) -> list:
        return [names[i] if i < 0 else index.owners[i] for i in found.tolist()]

    assert named(index.resolve(addresses, lo, hi)) == [q[3] for q in queries]
    assert named(index.lookup(addresses, lo, hi)) == [q[4] for q in queries]


def test_column_wise_answers_through_reuse_sharing_and_purge():
    """One index through a pod's IP changing hands, a second address left alone, a node address shared with a
    hostNetwork pod, and two purges; asked between the changes (segments are rebuilt only for the addresses
    whose claims changed). Each answer is derived by hand from the rules in ipindex's docstring (grace 10)."""
    index = IpIndex(grace=10)
    index.claim(X, A, start=0)
    index.claim(Y, B, start=0)
    index.claim(N, NODE_A, start=-math.inf, shared=True, node="node-a")
    index.claim(N, C, start=0, shared=True, node="node-a")
    #          address, lo, hi, resolve, lookup (which says "varies" for a window across a change)
    answers(index, [
        (X, 5, 5, A, A),
        (Y, 5, 5, B, B),
        (N, 5, 5, NODE_A, NODE_A),  # the node, never its hostNetwork pod
        (OUTSIDE, 5, 5, "unclaimed", "unclaimed"),
        (X, -5, -1, None, None),  # before A took it
        (X, -1, 1, A, "varies"),  # A from 0 on, nobody before: A
    ])  # fmt: skip
    index.release(X, A, at=20)  # named by A until 30 ...
    index.claim(X, B, start=25)  # ... cut short at 25 by B
    answers(index, [
        (X, 22, 22, A, A),  # in A's grace
        (X, 25, 25, B, B),
        (X, 24, 26, AMBIGUOUS, "varies"),  # across the hand-over: no guess
        (X, 5, 5, A, A),
        (Y, 5, 5, B, B),  # unchanged address, kept segments
        (N, 5, 5, NODE_A, NODE_A),
    ])  # fmt: skip
    index.release(Y, B, at=40)  # named by B until 50
    assert index.purge(now=55) == 1  # A's claim of X: its grace ended at 25, one more grace ago at 35
    index.claim(Y, C, start=60)
    index.claim(Y, A, start=70)  # C has not let go: two live owners from 70
    index.release(N, C, at=100)
    answers(index, [
        (X, 5, 5, None, None),  # A's claim is gone; B's starts at 25
        (X, 30, 30, B, B),
        (Y, 45, 45, B, B),  # in B's grace
        (Y, 50, 50, None, None),
        (Y, 45, 55, B, "varies"),  # B's grace, then nobody: B
        (Y, 65, 65, C, C),
        (Y, 80, 80, AMBIGUOUS, AMBIGUOUS),
        (N, 105, 105, NODE_A, NODE_A),  # the node and its pod in its grace: still the node
    ])  # fmt: skip
    # B's claim of Y (grace ended at 50, kept until 60) and C's of N (110, kept until 120)
    assert index.purge(now=200) == 2
    answers(index, [
        (Y, 45, 45, None, None),
        (Y, 65, 65, C, C),
        (N, 105, 105, NODE_A, NODE_A),
        (OUTSIDE, 150, 150, "unclaimed", "unclaimed"),
    ])  # fmt: skip


def test_a_window_across_a_hand_over_varies_and_resolves_to_no_guess():
    index = IpIndex(grace=60)
    index.claim("10.0.0.5", A, start=-math.inf)
    index.release("10.0.0.5", A, at=100)
    index.claim("10.0.0.5", B, start=130)
    queries = np.array(["10.0.0.5"] * 4 + ["10.9.9.9"], dtype=object)
    lo, hi = np.array([50.0, 120, 130, 125, 50]), np.array([60.0, 125, 500, 135, 60])
    a, b = index.owner_id(A), index.owner_id(B)
    assert index.lookup(queries, lo, hi).tolist() == [a, a, b, ANSWER_VARIES, ANSWER_UNCLAIMED]
    assert index.resolve(queries, lo, hi).tolist() == [a, a, b, ANSWER_AMBIGUOUS, ANSWER_UNCLAIMED]


def test_networks_answer_addresses_nobody_claimed():
    index = IpIndex(grace=60)
    index.add_network("192.0.2.0/24", ("pod", "corp"))
    answers = index.network_answers(np.array(["192.0.2.7", "198.51.100.1", "not-an-ip"], dtype=object))
    assert answers.tolist() == [index.owner_id(("pod", "corp")), ANSWER_UNCLAIMED, ANSWER_UNCLAIMED]


def test_purge_renumbers_owners_and_addresses_once_most_are_gone(monkeypatch):
    monkeypatch.setattr(ipindex, "COMPACT_AFTER", 4)
    index = IpIndex(grace=10)
    for i in range(10):
        index.claim(f"10.0.1.{i}", ("pod", f"old-{i}"), start=0)
        index.release(f"10.0.1.{i}", ("pod", f"old-{i}"), at=5)
    index.claim("10.0.2.1", A, start=0)
    assert index.lookup(np.array(["10.0.2.1"], dtype=object), 1.0, 1.0).tolist() == [index.owner_id(A)]
    assert index.purge(now=26) == 10
    assert index.epoch == 1 and index.owners == [A]
    queries = np.array(["10.0.2.1", "10.0.1.3"], dtype=object)
    assert index.lookup(queries, 30.0, 30.0).tolist() == [0, ANSWER_UNCLAIMED]
