"""The balancer against brute force on random cost vectors (cuts, replicas, memory, shared cores)."""
from __future__ import annotations

import itertools
import random

import pytest

from mmpipe.dsl.balance import Infeasible, Resources, Segment, cut_fronts, joined, solve, solve_joins


def all_cuts(n: int) -> list[list[list[int]]]:
    out = []
    for mask in range(2 ** (n - 1)):
        bounds = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        out.append([[a, b] for a, b in zip(bounds, bounds[1:])])
    return out


def brute(segs: list[Segment], res: Resources) -> tuple[float, int, float, float] | None:
    """Every cut and copy count of every node: the best (period, copies, stages in a row, slowest, memory)."""
    floor = sum(sum(s.cpus) for s in segs) / res.cores if res.cores > 0 else 0.0
    top = res.max_replicas or res.budget
    per_node = []
    for s in segs:
        opts = []
        cuts = [s.pieces] if s.pieces is not None else [c for c in all_cuts(len(s.times)) if all(s.allowed(lo, hi) for lo, hi in c)]
        reps = [s.replicas] if s.replicas is not None else range(1, top + 1)
        for pieces, r in itertools.product(cuts, reps):
            mems = [s.stage_memory(lo, hi) for lo, hi in pieces]
            if not res.shared_memory and max(mems) > res.memory:
                continue
            opts.append((len(pieces) * r, max(s.stage_time(lo, hi) for lo, hi in pieces) / r, sum(mems) * r, len(pieces)))
        per_node.append(opts)
    best = None
    for combo in itertools.product(*per_node):
        copies = sum(c for c, _, _, _ in combo)
        mem = sum(m for _, _, m, _ in combo)
        if copies > res.budget or copies < res.min_copies or (res.shared_memory and mem > res.memory):
            continue
        slowest = max(t for _, t, _, _ in combo)
        depth = sum(k for _, _, _, k in combo)
        key = (round(max(slowest, floor), 9), copies, depth, round(slowest, 9), round(mem, 6))
        if best is None or key < best:
            best = key
    return best


def random_segments(rng: random.Random, memory: bool) -> list[Segment]:
    segs = []
    for i in range(rng.randint(1, 3)):
        n = rng.randint(1, 5)
        times = [round(rng.uniform(0.05, 3.0), 3) for _ in range(n)]
        seg = Segment(f"n{i}", times, cpus=[t * rng.choice([0.0, 0.5, 1.0, 2.0]) for t in times],
                      params=[rng.randint(1, 9) * 100.0 for _ in range(n)] if memory else [],
                      acts=[rng.randint(0, 5) * 10.0 for _ in range(n)] if memory else [],
                      xfer=[round(rng.uniform(0, 0.3), 3) for _ in range(n)], loop=rng.random() < 0.3)
        if rng.random() < 0.2:  # a node with fixed cuts
            seg.pieces = rng.choice(all_cuts(n))
        if rng.random() < 0.2:  # a node with a fixed copy count
            seg.replicas = rng.randint(1, 2)
        segs.append(seg)
    return segs


@pytest.mark.parametrize("seed", range(300))
def test_solve_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    memory = seed % 3 != 0
    segs = random_segments(rng, memory)
    shared = memory and rng.random() < 0.5
    res = Resources(budget=rng.randint(1, 7), cores=rng.choice([0.0, 0.0, 1.0, 2.0, 4.0]),
                    memory=(rng.randint(8, 40) * 100.0 if memory else float("inf")), shared_memory=shared,
                    max_replicas=rng.choice([0, 1, 2, 3]), min_copies=rng.choice([1, 1, 2]))
    want = brute(segs, res)
    if want is None:
        with pytest.raises(Infeasible):
            solve(segs, res)
        return
    got = solve(segs, res)
    total_mem = sum(got.replicas[s.name] * sum(s.stage_memory(lo, hi) for lo, hi in got.pieces[s.name]) for s in segs)
    assert (round(got.period, 9), got.copies, got.depth, round(got.slowest, 9), round(total_mem, 6)) == want
    assert got.depth == sum(len(p) for p in got.pieces.values())
    # the answer is what it says: its own numbers recomputed from its cuts
    assert got.copies == sum(len(p) * got.replicas[n] for n, p in got.pieces.items())
    slowest = max(s.stage_time(lo, hi) / got.replicas[s.name] for s in segs for lo, hi in got.pieces[s.name])
    assert got.slowest == pytest.approx(slowest)
    for s in segs:
        ps = got.pieces[s.name]
        assert ps[0][0] == 0 and ps[-1][1] == len(s.times) and all(a[1] == b[0] for a, b in zip(ps, ps[1:]))
        if s.pieces is not None:
            assert ps == s.pieces
        if s.replicas is not None:
            assert got.replicas[s.name] == s.replicas


def test_cuts_balance_a_chain() -> None:
    seg = Segment("chain", [1, 1, 1, 1, 4, 4])
    got = solve([seg], Resources(budget=3, max_replicas=1))
    assert got.pieces["chain"] == [[0, 4], [4, 5], [5, 6]] and got.slowest == 4


def test_replicas_take_the_slow_node() -> None:
    enc, dec = Segment("enc", [3.0]), Segment("dec", [1.0], loop=True)
    got = solve([enc, dec], Resources(budget=4))
    assert got.replicas == {"enc": 3, "dec": 1} and got.slowest == 1.0


def test_shared_cores_stop_adding_copies() -> None:
    # 2 cores, every stage keeps a core busy: 4 s of CPU per micro-batch cannot go below 2 s
    enc, dec = Segment("enc", [1.5, 1.5]), Segment("dec", [1.0])
    got = solve([enc, dec], Resources(budget=8, cores=2))
    assert got.period == 2.0 and got.floor == 2.0
    # [enc][dec] is 3 s; cutting enc in two, or two copies of it, reaches the floor, and more
    # copies would not help; of the two, copies make the shorter pipeline
    assert got.copies == 3 and got.slowest == 1.5 and got.replicas == {"enc": 2, "dec": 1} and got.depth == 2


def test_memory_limit_forces_a_cut() -> None:
    seg = Segment("big", [1.0, 1.0], params=[6.0, 6.0])
    assert solve([seg], Resources(budget=2, memory=10)).pieces["big"] == [[0, 1], [1, 2]]
    with pytest.raises(Infeasible, match="memory"):
        solve([seg], Resources(budget=2, memory=5))
    with pytest.raises(Infeasible, match="memory"):  # one host's memory for every copy
        solve([seg], Resources(budget=2, memory=10, shared_memory=True))


def test_budget_too_small() -> None:
    with pytest.raises(Infeasible, match="at least 2"):
        solve([Segment("a", [1.0]), Segment("b", [1.0])], Resources(budget=1))


def test_fronts_keep_memory_tradeoffs() -> None:
    # cutting after part 0 is fastest; cutting after part 1 needs less memory per copy
    seg = Segment("n", [1.0, 1.0, 1.0], params=[1, 1, 1], acts=[0, 50, 0])
    front = cut_fronts(seg, 2, float("inf"))
    assert [p for _, _, p in front][0] in ([[0, 1], [1, 3]], [[0, 2], [2, 3]])
    assert all(a[0] <= b[0] and a[1] > b[1] for a, b in zip(front, front[1:]))


def random_joinable(rng: random.Random) -> tuple[list[Segment], dict[int, bool]]:
    """Heavy nodes, some loops; every node before a loop may be joined with it (some must)."""
    segs = random_segments(rng, memory=rng.random() < 0.5)
    for s in segs:
        s.pieces = None  # the balancer cuts nodes it may join
    pairs = {}
    for i in range(len(segs) - 1):
        if not segs[i].loop and segs[i + 1].loop and (segs[i].replicas or 1) == 1 and (segs[i + 1].replicas or 1) == 1:
            pairs[i] = rng.random() < 0.3
    return segs, pairs


@pytest.mark.parametrize("seed", range(200))
def test_joins_match_brute_force(seed: int) -> None:
    """A loop's first stage may take in the last piece of the node before it: the best over
    every subset of joins, each solved by brute force, is what ``solve_joins`` finds."""
    rng = random.Random(1000 + seed)
    segs, pairs = random_joinable(rng)
    if not pairs:  # make one: a node followed by a loop
        segs = [Segment("a", [round(rng.uniform(0.1, 2), 3) for _ in range(rng.randint(1, 4))]),
                Segment("b", [round(rng.uniform(0.1, 2), 3) for _ in range(rng.randint(1, 4))], loop=True)]
        pairs = {0: rng.random() < 0.3}
    res = Resources(budget=rng.randint(1, 6), cores=rng.choice([0.0, 0.0, 2.0]), max_replicas=rng.choice([0, 1, 2]))
    best = None
    optional = [i for i, must in pairs.items() if not must]
    for mask in range(2 ** len(optional)):
        chosen = {i for k, i in enumerate(optional) if mask >> k & 1} | {i for i, must in pairs.items() if must}
        merged, i = [], 0
        while i < len(segs):
            merged.append(joined(segs[i], segs[i + 1], pairs[i]) if i in chosen else segs[i])
            i += 2 if i in chosen else 1
        got = brute(merged, res)
        if got is not None and (best is None or got < best):
            best = got
    if best is None:
        with pytest.raises(Infeasible):
            solve_joins(segs, res, pairs)
        return
    got = solve_joins(segs, res, pairs)
    assert (round(got.period, 9), got.copies, got.depth, round(got.slowest, 9)) == best[:4]
    # the answer in each node's own pieces: every node covered, joins only where allowed
    for s in segs:
        ps = got.pieces[s.name]
        assert ps[0][0] == 0 and ps[-1][1] == len(s.times) and all(a[1] == b[0] for a, b in zip(ps, ps[1:]))
    by = {s.name: i for i, s in enumerate(segs)}
    for loop in got.joins:
        assert by[loop] - 1 in pairs and got.replicas[loop] == got.replicas[segs[by[loop] - 1].name] == 1
    for i, must in pairs.items():
        if must:
            assert segs[i + 1].name in got.joins
    # stage count: a joined stage is one copy
    assert got.copies == sum(len(p) * got.replicas[n] for n, p in got.pieces.items()) - len(got.joins)


def test_a_join_balances_an_encoder_and_a_light_loop() -> None:
    """Encoder 4 x 1 s, decode loop 2 s: two stages balance only if the loop's stage takes in
    the encoder's tail (3 s each) instead of encoder | loop (4 s and 2 s)."""
    enc, dec = Segment("enc", [1.0] * 4), Segment("dec", [1.0, 1.0], loop=True)
    plain = solve([enc, dec], Resources(budget=2, max_replicas=1))
    assert plain.slowest == 4.0
    got = solve_joins([enc, dec], Resources(budget=2, max_replicas=1), {0: False})
    assert got.slowest == 3.0 and got.joins == ["dec"]
    assert got.pieces == {"enc": [[0, 3], [3, 4]], "dec": [[0, 2]]} and got.copies == 2
