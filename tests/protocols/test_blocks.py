"""Automatic block reads (protocols.dlt645.blocks): which plan items one block read serves, and that a
block reply decodes to exactly what the members' single replies decode to."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.dlt645 import find, lookup
from protocols.dlt645.blocks import FRAME_BYTES, Read, answered, home_blocks, missing, plan_reads
from protocols.dlt645.replies import decode_data

MEMBERS = {ed: sorted(lookup(di, ed).name for di in home_blocks(ed)) for ed in (2007, 1997)}  # type: ignore[union-attr]
OTHERS = {2007: ["daily_freeze_forward_active_energy_last1", "frequency", "date", "00010000", "0201FF00",
                 "forward_active_energy_block"],
          1997: ["date", "time", "9010", "forward_active_max_demand"]}


def width(name: str, edition: int) -> int:
    return sum(f.fmt.width for f in find(name, edition).fields)


@st.composite
def plans(draw: st.DrawFn) -> tuple[int, list[str], int, set[int]]:
    edition = draw(st.sampled_from([2007, 1997]))
    # mostly members of a few blocks (so merges happen), some others, repeats allowed
    blocks = sorted({b.di for b, _ in home_blocks(edition).values()})
    chosen = draw(st.lists(st.sampled_from(blocks), min_size=1, max_size=3))
    pool = [lookup(di, edition).name for b in chosen for di in lookup(b, edition).members]  # type: ignore[union-attr]
    names = draw(st.lists(st.sampled_from(pool + OTHERS[edition] + MEMBERS[edition][:50]), min_size=1, max_size=12))
    avoid = set(draw(st.lists(st.sampled_from(chosen), max_size=1)))
    return edition, names, draw(st.integers(1, 14)), avoid


@settings(max_examples=400, deadline=None)
@given(plans())
def test_every_item_is_served_once_and_only_by_its_home_block_when_that_saves_bytes(plan):
    edition, names, tariffs, avoid = plan
    reads = plan_reads(names, edition, tariffs=tariffs, avoid=avoid)
    served = [name for r in reads for name in r.serves]
    assert set(served) == set(names)
    at = -1
    for r in reads:  # reads come in the order of their first item
        at = names.index(r.serves[0], at + 1)
    for r in reads:
        if not r.merged:  # a single read is exactly what the plan named, as often as it named it
            assert len(r.serves) == 1 and r.item == find(r.serves[0], edition)
            continue
        assert r.item.is_block and r.item.di not in avoid and len(set(r.serves)) == len(r.serves)
        members = {find(n, edition).di for n in r.serves}
        assert len(members) >= 2
        for di in members:
            block, position = home_blocks(edition)[di]
            assert block == r.item and position < answered(block, tariffs)
        block_bytes = FRAME_BYTES[edition] + sum(width(lookup(di, edition).name, edition)  # type: ignore[union-attr]
                                                 for di in r.item.members[: answered(r.item, tariffs)])
        assert block_bytes < sum(FRAME_BYTES[edition] + width(lookup(di, edition).name, edition)  # type: ignore[union-attr]
                                 for di in members)
    merged_names = [n for r in reads if r.merged for n in r.serves]
    assert sum(1 for r in reads if not r.merged) == sum(1 for n in names if n not in merged_names)


@settings(max_examples=300, deadline=None)
@given(plans(), st.randoms(use_true_random=False))
def test_a_block_reply_decodes_to_what_the_single_replies_decode_to(plan, rnd: random.Random):
    edition, names, tariffs, _ = plan
    for r in plan_reads(names, edition, tariffs=tariffs):
        if not r.merged:
            continue
        parts = {di: rnd.randbytes(width(lookup(di, edition).name, edition))  # type: ignore[union-attr]
                 for di in r.item.members[: answered(r.item, tariffs)]}
        block = decode_data(r.item.di, b"".join(parts.values()), edition, tariffs=tariffs)
        assert block.complete and missing(r, block.values, edition) == ()
        for name in r.serves:
            single = decode_data(find(name, edition).di, parts[find(name, edition).di], edition)
            assert single.complete
            assert {k: block.values[k] for k in single.values} == single.values


def test_examples():
    energy = ["forward_active_energy", *(f"forward_active_energy_t{n}" for n in range(1, 5))]
    (block, voltage) = plan_reads([*energy, "voltage_a"])
    assert block == Read(find("forward_active_energy_block"), tuple(energy), merged=True)
    assert voltage == Read(find("voltage_a"), ("voltage_a",))
    assert [r.item.name for r in plan_reads(energy[:2], tariffs=14)] == energy[:2]  # 15 members: not worth it
    assert [r.item.name for r in plan_reads(energy, avoid={0x0001FF00})] == energy
    assert [r.item.name for r in plan_reads(["status_word_1", "status_word_3"])] == ["status_words"]
    assert [r.item.name for r in plan_reads(["9010", "9011"], 1997)] == ["forward_active_energy_block"]
    assert plan_reads(["voltage_a", "voltage_a", "voltage_b"])[0].serves == ("voltage_a", "voltage_b")


def test_freeze_records_and_nested_blocks_never_stand_in_for_current_values():
    homes = {block.name for block, _ in home_blocks(2007).values()}
    assert "forward_active_energy_block" in homes and "trip_record_last1" in homes
    assert not any("freeze" in name for name in homes)
    assert home_blocks(2007)[0x00010000][0].name == "forward_active_energy_block"


def test_missing_names_the_items_a_short_block_reply_lacks():
    (read,) = plan_reads(["forward_active_energy", "forward_active_energy_t1", "forward_active_energy_t3"])
    short = decode_data(read.item.di, bytes(8), 2007)  # a meter that answered total and t1 only
    assert missing(read, short.values) == ("forward_active_energy_t3",)
