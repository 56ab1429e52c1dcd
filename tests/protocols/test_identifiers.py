"""The data-identifier table is consistent data."""

from __future__ import annotations

import pytest

from protocols.dlt645 import ReadSequence, decode, find, lookup, parse, read_follow_up, read_reply
from protocols.dlt645.identifiers import BY_NAME, TABLE_1997, TABLE_2007


@pytest.mark.parametrize("edition", [2007, 1997])
def test_names_are_unique_per_edition(edition):
    table = TABLE_2007 if edition == 2007 else TABLE_1997
    assert len(BY_NAME[edition]) == len(table)


def test_every_block_member_and_1997_equivalent_exists():
    for table, edition in ((TABLE_2007, 2007), (TABLE_1997, 1997)):
        for item in table.values():
            for member in item.members:
                assert lookup(member, edition) is not None, f"{item.name}: member {member:X} missing"
            if edition == 1997 and item.equivalent:
                assert item.equivalent in TABLE_2007, f"{item.name}: 2007 equivalent {item.equivalent:08X} missing"


def test_field_names_and_types_agree_across_editions():
    # The same quantity decodes to the same type whichever edition the meter speaks.
    for item in TABLE_1997.values():
        if item.equivalent and item.fields and item.equivalent in TABLE_2007:
            other = {f.name: f for f in TABLE_2007[item.equivalent].fields}
            for field in item.fields:
                if field.name in other:
                    assert field.unit == other[field.name].unit, field.name


def test_the_reference_families_are_covered():
    for name in ("forward_active_energy_t4_last12", "forward_active_energy_block", "forward_active_max_demand",
                 "voltage_block", "current_c", "active_power", "power_factor_a", "frequency", "voltage_thd_a",
                 "date", "time", "address", "meter_number", "status_word_3", "status_words",
                 "daily_freeze_time_last62", "daily_freeze_forward_active_energy_last1", "daily_freeze_last1",
                 "hourly_freeze_forward_active_energy_last1", "load_profile_from", "power_down_record_last1",
                 "cover_open_record_last1", "trip_time_last1", "close_record_last1", "remaining_money",
                 "remaining_energy", "trip_delay"):
        assert find(name).name == name
    assert find("0201FF00").name == "voltage_block"
    assert find("9010", 1997).equivalent == 0x00010000
    with pytest.raises(KeyError):
        find("no_such_quantity")


def test_status_word_3_names_its_bits():
    frames = read_reply("000000000001", 0x04000503, (0x1050).to_bytes(2, "little"))
    q = decode(parse(frames[0])).values["status_word_3"]
    assert q.value == 0x1050
    assert set(q.flags) == {"relay_open", "relay_trip_command", "power_hold"}


def test_energy_block_answered_with_four_tariffs():
    payload = b"".join(bytes.fromhex(f"{v:08d}")[::-1] for v in (120642, 10000, 20000, 30000, 60642))
    reply = decode(parse(read_reply("000000000001", 0x0001FF00, payload)[0]))
    assert reply.complete
    assert [reply.values[k].value for k in ("forward_active_energy", "forward_active_energy_t1",
            "forward_active_energy_t4")] == [1206.42, 100.0, 606.42]
    assert "forward_active_energy_t5" not in reply.values


def test_daily_freeze_record_with_nested_blocks_uses_the_tariff_count():
    stamp = bytes.fromhex("00 00 22 11 26")  # 2026-11-22 00:00
    energies = b"".join(bytes.fromhex(f"{v:08d}")[::-1] for v in range(1, 6))
    payload = stamp + energies * 8 + bytes(8) * 5 * 2 + bytes(24)  # 269 bytes: two frames
    frames = read_reply("000000000001", 0x0506FF01, payload)
    assert len(frames) == 2
    sequence = ReadSequence("000000000001", 0x0506FF01)
    follow_up = sequence.feed(decode(parse(frames[0])))
    assert follow_up == read_follow_up("000000000001", 0x0506FF01, 1)
    assert sequence.feed(decode(parse(frames[1]))) is None
    reply = sequence.reply
    assert reply is not None and reply.payload == payload
    assert reply.values["daily_freeze_time_last1"].value.isoformat() == "2026-11-22T00:00:00"
    assert reply.values["forward_active_energy_t4"].value == 0.05
    assert reply.values["active_power"].value == 0.0
    assert reply.complete
