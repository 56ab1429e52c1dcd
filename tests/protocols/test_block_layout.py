"""Block replies decode from precomputed member offsets: the same values, used length and
completeness as decoding member by member (the table's definition of a block), for every block
of both editions and any payload length: whole, cut at a member edge, cut inside one, too long."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.dlt645 import decode
from protocols.dlt645.frame import Frame
from protocols.dlt645.identifiers import ITEMS, lookup
from protocols.dlt645.items import DataItem, Quantity, decode_fields
from protocols.dlt645.replies import decode_data

BLOCKS = [i for i in ITEMS if i.members]


def member_by_member(item: DataItem, payload: bytes, edition: int, tariffs: int,
                     nested: bool = False) -> tuple[dict[str, Quantity], int, bool]:
    """The reference: look every member up and decode it where the previous one ended."""
    values: dict[str, Quantity] = {}
    members = item.members if item.fixed or not nested else item.members[: tariffs + 1]
    pos = 0
    for di in members:
        member = lookup(di, edition)
        if member is None:
            return values, pos, False
        if member.members:
            sub, used, ok = member_by_member(member, payload[pos:], edition, tariffs, True)
            values.update(sub)
            pos += used
            if not ok:
                return values, pos, False
            continue
        width = sum(f.fmt.width for f in member.fields)
        if pos + width > len(payload):
            return values, pos, not item.fixed and pos == len(payload) and pos > 0
        values.update(decode_fields(member.fields, payload[pos:pos + width]).values)
        pos += width
    return values, pos, True


def full_width(item: DataItem, edition: int, tariffs: int) -> int:
    _, used, _ = member_by_member(item, bytes(4096), edition, tariffs)
    return used


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(BLOCKS), st.sampled_from([1, 2, 4, 8, 14]), st.data())
def test_a_block_decodes_as_its_members_do(item: DataItem, tariffs: int, data: st.DataObject) -> None:
    whole = full_width(item, item.edition, tariffs)
    size = data.draw(st.integers(0, whole + 6), label="payload length")
    # BCD digits mostly, with a few bytes that are not BCD (invalid values are flagged, not errors)
    payload = bytes(data.draw(st.lists(st.sampled_from([0x00, 0x12, 0x99, 0x45, 0xFF, 0x80]),
                                       min_size=size, max_size=size)))
    values, used, complete = member_by_member(item, payload, item.edition, tariffs)
    expected = (values, complete and used == len(payload))
    got = decode_data(item.di, payload, item.edition, tariffs=tariffs)
    assert (got.values, got.complete) == expected
    assert list(got.values) == list(values)  # the same order too (sinks and readings follow it)
    if item.edition == 2007:  # a one-frame block reply takes decode()'s fast path
        reply = decode(Frame("000000000001", 0x91, item.di.to_bytes(4, "little") + payload), tariffs=tariffs)
        assert (reply.values, reply.complete, reply.item, reply.payload) == (*expected, item, payload)


def test_energy_block_of_a_four_tariff_meter() -> None:
    item = next(i for i in BLOCKS if i.name == "forward_active_energy_block")
    reply = decode(Frame("000000000001", 0x91, item.di.to_bytes(4, "little") + bytes.fromhex("12345600" * 5)))
    assert reply.complete and list(reply.values) == ["forward_active_energy"] + [
        f"forward_active_energy_t{n}" for n in range(1, 5)]
    assert {q.value for q in reply.values.values()} == {5634.12}
    cut = decode(Frame("000000000001", 0x91, item.di.to_bytes(4, "little") + bytes.fromhex("12345600" * 5)[:-2]))
    assert not cut.complete and len(cut.values) == 4  # cut inside t4: flagged, the whole members kept
