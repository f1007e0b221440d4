"""`--limit N` everywhere: a seeded sample stratified by label, then by view, in the items' own order.

Shares go by largest remainder at each level (classes first, so every class is in a sample of at
least six, then views within a class); ties are broken by the seed, so the same N and seed always
give the same sample.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def stratified_sample(items: Sequence[T], n: int | None, seed: int, *levels: Callable[[T], Hashable]) -> list[T]:
    """`n` of `items` (all of them when n is None or too large), stratified by each level in turn."""
    if n is None or n >= len(items):
        return list(items)
    position = {id(item): i for i, item in enumerate(items)}
    chosen = pick(list(items), n, levels, random.Random(seed))
    return sorted(chosen, key=lambda item: position[id(item)])


def pick(items: list[T], n: int, levels: Sequence[Callable[[T], Hashable]], rng: random.Random) -> list[T]:
    if not levels or n == 0:
        return rng.sample(items, n)
    groups: dict[Hashable, list[T]] = defaultdict(list)
    for item in items:
        groups[levels[0](item)].append(item)
    keys = sorted(groups, key=str)
    quotas = allocate(n, [len(groups[k]) for k in keys], rng)
    return [item for key, quota in zip(keys, quotas, strict=True) for item in pick(groups[key], quota, levels[1:], rng)]


def allocate(n: int, sizes: list[int], rng: random.Random) -> list[int]:
    """n split in proportion to sizes: floors, then one more each for the largest remainders."""
    total = sum(sizes)
    exact = [n * size / total for size in sizes]
    quotas = [int(share) for share in exact]
    ties = [rng.random() for _ in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (quotas[i] - exact[i], ties[i]))
    for i in order[: n - sum(quotas)]:
        quotas[i] += 1
    return quotas
