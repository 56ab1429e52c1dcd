"""Automatic block reads: which single items of a plan one block read (…FF…) can serve.

DL/T 645 reads a data block by putting FF in one DI byte (1997: F in one nibble); the reply is
the members' payloads back to back, and decodes to the same quantities the members decode to
alone. A plan asking for several members of one block (forward_active_energy and _t1.._t4)
therefore needs one transaction instead of five. Sans-I/O: `plan_reads` says what to read; after
a merged block answered, `missing` says which of its plan items the reply did not carry (read
them alone). A meter that answers a block with an error (1997 meters and meters without block
support do) is read with singles: the caller passes such blocks in `avoid`.

Only a member's *home* block is used: the block DI is the member's DI with one byte (nibble)
set to all-ones, the standard's own rule. A freeze record also lists 00010000 as a member, but
its payload is the value at the freeze, not the current one, so it never serves a single read.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cache

from protocols.dlt645.identifiers import ITEMS, find, lookup
from protocols.dlt645.items import DataItem

FRAME_BYTES = {2007: 2 * (12 + 4) + 4, 1997: 2 * (12 + 2) + 4}  # request + reply header, DI, 4 FE: per read


@dataclass(frozen=True, slots=True)
class Read:
    """One read of a plan: `item` to read, `serves` the plan's names it answers (in plan order).

    `merged`: a block read standing in for single items of the plan (not a block the plan named).
    """

    item: DataItem
    serves: tuple[str, ...]
    merged: bool = False


def _home_unit(block: int, member: int, edition: int) -> bool:
    """True when `block` is `member` with one byte (2007) or nibble (1997) set to all-ones."""
    bits, units = (8, 4) if edition == 2007 else (4, 4)
    for k in range(units):
        mask = ((1 << bits) - 1) << (bits * k)
        if block & mask == mask and block & ~mask == member & ~mask and member & mask != mask:
            return True
    return False


@cache
def home_blocks(edition: int = 2007) -> dict[int, tuple[DataItem, int]]:
    """Member DI -> (its home block, its position in the block), for blocks of plain items."""
    index: dict[int, tuple[DataItem, int]] = {}
    table = {i.di: i for i in ITEMS if i.edition == edition}
    for block in table.values():
        if not block.members:
            continue
        members = [table.get(di) for di in block.members]
        if not all(m is not None and m.fields and _home_unit(block.di, m.di, edition) for m in members):
            continue
        for position, di in enumerate(block.members):
            index.setdefault(di, (block, position))
    return index


def answered(block: DataItem, tariffs: int) -> int:
    """How many members a meter answers: all of a fixed block, total + `tariffs` of an open one."""
    return len(block.members) if block.fixed else min(len(block.members), tariffs + 1)


def _width(item: DataItem) -> int:
    return sum(f.fmt.width for f in item.fields)


def plan_reads(names: Iterable[str], edition: int = 2007, *, tariffs: int = 4,
               avoid: Collection[int] = ()) -> list[Read]:
    """The reads for a plan's items, in the order of their first item; KeyError for an unknown name.

    Items of one home block are merged when the block read moves fewer bytes than the single
    reads it replaces (each transaction costing `FRAME_BYTES` besides its payload). Members a
    meter with `tariffs` tariffs would not answer, and blocks in `avoid`, stay single reads.
    """
    index = home_blocks(edition)
    items = [(name, find(name, edition)) for name in names]
    groups: dict[int, list[tuple[str, DataItem]]] = {}
    for name, item in items:
        home = index.get(item.di)
        if home is not None and home[0].di not in avoid and home[1] < answered(home[0], tariffs):
            groups.setdefault(home[0].di, []).append((name, item))
    overhead = FRAME_BYTES[edition]
    merged: dict[str, int] = {}  # plan name -> block DI it is served by
    for block_di, members in groups.items():
        block = index[members[0][1].di][0]
        distinct = {item.di: item for _, item in members}
        if len(distinct) < 2:
            continue
        block_cost = overhead + sum(_width(m) for m in _members(block, tariffs, edition))
        singles_cost = sum(overhead + _width(m) for m in distinct.values())
        if block_cost < singles_cost:
            merged.update((name, block_di) for name, _ in members)
    reads: list[Read] = []
    placed: dict[int, int] = {}  # block DI -> index in reads
    for name, item in items:
        by = merged.get(name)
        if by is None:
            reads.append(Read(item, (name,)))
        elif by in placed:
            at = placed[by]
            if name not in reads[at].serves:
                reads[at] = Read(reads[at].item, (*reads[at].serves, name), merged=True)
        else:
            placed[by] = len(reads)
            reads.append(Read(index[item.di][0], (name,), merged=True))
    return reads


def _members(block: DataItem, tariffs: int, edition: int) -> list[DataItem]:
    """The members a meter with `tariffs` tariffs answers (home blocks hold plain, known items only)."""
    return [m for di in block.members[: answered(block, tariffs)] if (m := lookup(di, edition)) is not None]


def fields_of(name: str, edition: int = 2007) -> tuple[str, ...]:
    """The quantity names a plain item's reply carries (what a single read of it produces)."""
    return tuple(f.name for f in find(name, edition).fields)


def missing(read: Read, values: Collection[str], edition: int = 2007) -> tuple[str, ...]:
    """The plan names of a merged read whose quantities are not all in a block reply's `values`."""
    return tuple(name for name in read.serves if not all(f in values for f in fields_of(name, edition)))
