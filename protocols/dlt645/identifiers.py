"""The data-identifier table: DI -> name, unit, format, block members, 1997 equivalent.

This module is data. Families that the standard numbers by a rule (energy
``00 TT RR SS``, demand ``01 TT RR SS``, freezes ``05 KK II NN``, event
records) are spelled out by small loops over the rule's tables below; single
items are rows. Names are the quantity names plans and readings use:
``_t<n>`` is tariff n, ``_last<n>`` is the n-th most recent settlement period,
freeze or record (上n次). Items marked (verify) follow a single public
source; their layout is an assumption to check against a real meter.
"""

from __future__ import annotations

from protocols.dlt645.formats import Ascii, Bcd, Binary, Digits, Format, Raw, Time
from protocols.dlt645.items import DataItem, Field

TARIFFS = 14  # tariff members generated per block (the standard allows up to 63; meters use 4-8)
SETTLEMENTS = 12  # current + 12 settlement periods back

ENERGY = Bcd(4, 2)
ENERGY_S = Bcd(4, 2, signed=True)
DEMAND = Bcd(3, 4)
STAMP = Time("YYMMDDhhmm")
MOMENT = Time("YYMMDDhhmmss")
COUNT3 = Bcd(3)
OPERATOR = Raw(4)

# Energy and demand types: TT -> (name, unit, signed)
ENERGY_TYPES: dict[int, tuple[str, str, bool]] = {
    0x00: ("combined_active", "kWh", True),
    0x01: ("forward_active", "kWh", False),
    0x02: ("reverse_active", "kWh", False),
    0x03: ("combined_reactive_1", "kvarh", True),
    0x04: ("combined_reactive_2", "kvarh", True),
    0x05: ("q1_reactive", "kvarh", False),
    0x06: ("q2_reactive", "kvarh", False),
    0x07: ("q3_reactive", "kvarh", False),
    0x08: ("q4_reactive", "kvarh", False),
    0x09: ("forward_apparent", "kVAh", False),
    0x0A: ("reverse_apparent", "kVAh", False),
}
PHASE_BASE = {"a": 0x14, "b": 0x28, "c": 0x3C}  # per-phase TT = base + type (types 01..0A)

# Status words 1..7: bit names (empty = reserved). Word 3 bits 12..15 are the State Grid extension.
STATUS_BITS: dict[int, tuple[str, ...]] = {
    1: ("", "demand_block_method", "clock_battery_low", "reading_battery_low",
        "active_power_reverse", "reactive_power_reverse", "", "", "", "", "", "", "", "", "", ""),
    2: ("active_reverse_a", "active_reverse_b", "active_reverse_c", "", "reactive_reverse_a",
        "reactive_reverse_b", "reactive_reverse_c", "", "", "", "", "", "", "", "", ""),
    3: ("second_day_table", "supply_auxiliary", "supply_battery", "programming_allowed",
        "relay_open", "second_zone_table", "relay_trip_command", "pre_trip_alarm",
        "prepaid_energy", "prepaid_money", "second_price_set", "second_step_set",
        "power_hold", "authenticated", "local_account_open", "remote_account_open"),
    4: ("voltage_loss", "under_voltage", "over_voltage", "current_loss", "over_current",
        "overload", "power_reverse", "phase_break", "current_break", "", "", "", "", "", "", ""),
    7: ("voltage_reverse_sequence", "current_reverse_sequence", "voltage_unbalance",
        "current_unbalance", "auxiliary_supply_loss", "power_down", "demand_over_limit",
        "power_factor_low", "severe_current_unbalance", "", "", "", "", "", "", ""),
}
STATUS_BITS[5] = STATUS_BITS[4]
STATUS_BITS[6] = STATUS_BITS[4]

ITEMS: list[DataItem] = []


def item(di: int, name: str, text: str, fmt: Format | None = None, unit: str = "", *,
         fields: tuple[Field, ...] = (), members: tuple[int, ...] = (), edition: int = 2007,
         equivalent: int | None = None, fixed: bool = False, bits: tuple[str, ...] = ()) -> None:
    """Add one row; a single-field item names its field after itself."""
    if fmt is not None:
        fields = (Field(name, fmt, unit, bits),)
    ITEMS.append(DataItem(di, name, text, fields, members, edition, equivalent, fixed))


def _suffix(settle: int) -> str:
    return f"_last{settle}" if settle else ""


# --- class 00 energy and class 01 demand: 0C TT RR SS -----------------------------------------
fmt: Format
for settle in range(SETTLEMENTS + 1):
    for tt, (kind, unit, signed) in ENERGY_TYPES.items():
        fmt = ENERGY_S if signed else ENERGY
        dunit = unit[:-1]  # kWh -> kW
        for rr in range(TARIFFS + 1):
            tariff = f"_t{rr}" if rr else ""
            name = f"{kind}_energy{tariff}{_suffix(settle)}"
            item(tt << 16 | rr << 8 | settle, name, f"{kind} energy{tariff}", fmt, unit)
            dname = f"{kind}_max_demand{tariff}{_suffix(settle)}"
            if tt in (0x00, 0x03, 0x04):
                continue  # combined quantities have no demand
            item(0x01000000 | tt << 16 | rr << 8 | settle, dname, f"{kind} max demand{tariff} and time",
                 fields=(Field(dname, DEMAND, dunit), Field(f"{dname}_time", STAMP)))
        item(tt << 16 | 0xFF00 | settle, f"{kind}_energy_block{_suffix(settle)}",
             f"{kind} energy total and tariffs",
             members=tuple(tt << 16 | rr << 8 | settle for rr in range(TARIFFS + 1)))
        if tt not in (0x00, 0x03, 0x04):
            item(0x01000000 | tt << 16 | 0xFF00 | settle, f"{kind}_max_demand_block{_suffix(settle)}",
                 f"{kind} max demand total and tariffs",
                 members=tuple(0x01000000 | tt << 16 | rr << 8 | settle for rr in range(TARIFFS + 1)))
    for phase, base in PHASE_BASE.items():
        for tt in range(0x01, 0x0B):
            kind, unit, _ = ENERGY_TYPES[tt]
            item((base + tt) << 16 | settle, f"{kind}_energy_{phase}{_suffix(settle)}",
                 f"phase {phase.upper()} {kind} energy", ENERGY, unit)

# --- class 02 variables --------------------------------------------------------------------------
PHASES = ("a", "b", "c")
VARIABLES: tuple[tuple[int, str, Format, str, bool], ...] = (
    # (DI1 DI2 prefix, name, format, unit, has total at 00)
    (0x0201, "voltage", Bcd(2, 1), "V", False),
    (0x0202, "current", Bcd(3, 3, signed=True), "A", False),
    (0x0203, "active_power", Bcd(3, 4, signed=True), "kW", True),
    (0x0204, "reactive_power", Bcd(3, 4, signed=True), "kvar", True),
    (0x0205, "apparent_power", Bcd(3, 4, signed=True), "kVA", True),
    (0x0206, "power_factor", Bcd(2, 3, signed=True), "", True),
    (0x0207, "phase_angle", Bcd(2, 1), "°", False),
    (0x0208, "voltage_thd", Bcd(2, 2), "%", False),
    (0x0209, "current_thd", Bcd(2, 2), "%", False),
)
for prefix, name, fmt, unit, has_total in VARIABLES:
    members = []
    if has_total:
        item(prefix << 16, name, f"{name} total", fmt, unit)
        members.append(prefix << 16)
    for n, phase in enumerate(PHASES, start=1):
        item(prefix << 16 | n << 8, f"{name}_{phase}", f"phase {phase.upper()} {name}", fmt, unit)
        members.append(prefix << 16 | n << 8)
    item(prefix << 16 | 0xFF00, f"{name}_block", f"{name} block", members=tuple(members), fixed=True)
for n, phase in enumerate(PHASES, start=1):
    for h in range(1, 22):
        item(0x020A0000 | n << 8 | h, f"voltage_harmonic_{phase}_{h}",
             f"phase {phase.upper()} voltage harmonic {h}", Bcd(2, 2), "%")
        item(0x020B0000 | n << 8 | h, f"current_harmonic_{phase}_{h}",
             f"phase {phase.upper()} current harmonic {h}", Bcd(2, 2), "%")
item(0x02800001, "neutral_current", "neutral current", Bcd(3, 3, signed=True), "A")
item(0x02800002, "frequency", "grid frequency", Bcd(2, 2), "Hz")
item(0x02800003, "average_active_power", "1-minute average active power", Bcd(3, 4, signed=True), "kW")
item(0x02800004, "active_demand", "current active demand", Bcd(3, 4, signed=True), "kW")
item(0x02800005, "reactive_demand", "current reactive demand", Bcd(3, 4, signed=True), "kvar")
item(0x02800006, "apparent_demand", "current apparent demand", Bcd(3, 4, signed=True), "kVA")
item(0x02800007, "temperature", "meter temperature", Bcd(2, 1, signed=True), "°C")
item(0x02800008, "clock_battery_voltage", "clock battery voltage", Bcd(2, 2), "V")
item(0x02800009, "reading_battery_voltage", "meter-reading battery voltage", Bcd(2, 2), "V")
item(0x0280000A, "battery_time", "internal battery working time", Bcd(4), "min")

# --- class 04 parameters -------------------------------------------------------------------------
item(0x04000101, "date", "date and weekday (YYMMDDWW, WW 0 = Sunday)", Time("YYMMDDWW"))
item(0x04000102, "time", "time of day", Time("hhmmss"))
item(0x04000103, "demand_period", "demand period", Bcd(1), "min")
item(0x04000104, "demand_slide", "demand sliding time", Bcd(1), "min")
item(0x04000201, "year_zone_count", "number of year time zones", Bcd(1))
item(0x04000202, "day_table_count", "number of daily slot tables", Bcd(1))
item(0x04000203, "day_slot_count", "number of slots per day", Bcd(1))
item(0x04000204, "tariff_count", "number of tariffs", Bcd(1))
item(0x04000205, "holiday_count", "number of public holidays", Bcd(2))
item(0x04000401, "address", "communication address", Digits(6))
item(0x04000402, "meter_number", "meter number (表号)", Digits(6))
item(0x04000403, "asset_number", "asset management number", Ascii(32))
item(0x04000404, "rated_voltage", "rated voltage", Ascii(6))
item(0x04000405, "rated_current", "rated current", Ascii(6))
item(0x04000406, "max_current", "maximum current", Ascii(6))
item(0x04000407, "active_accuracy", "active accuracy class", Ascii(4))
item(0x04000408, "reactive_accuracy", "reactive accuracy class", Ascii(4))
item(0x04000409, "active_constant", "active meter constant", Bcd(3), "imp/kWh")
item(0x0400040A, "reactive_constant", "reactive meter constant", Bcd(3), "imp/kvarh")
item(0x0400040B, "model", "meter model", Ascii(10))
item(0x0400040C, "production_date", "production date", Ascii(10))
item(0x0400040D, "protocol_version", "protocol version", Ascii(16))
for n in range(1, 8):
    item(0x04000500 | n, f"status_word_{n}", f"running status word {n}", Binary(2), bits=STATUS_BITS[n])
item(0x040005FF, "status_words", "running status words 1-7",
     members=tuple(0x04000500 | n for n in range(1, 8)), fixed=True)
item(0x04000601, "active_combination", "active combination word", Binary(1))
item(0x04000602, "reactive_combination_1", "reactive combination word 1", Binary(1))
item(0x04000603, "reactive_combination_2", "reactive combination word 2", Binary(1))
for n, port in enumerate(("ir_modulated", "ir_contact", "port_1", "port_2", "port_3"), start=1):
    item(0x04000700 | n, f"baud_{port}", f"baud-rate feature word, {port}", Binary(1))
item(0x04000A01, "load_record_start", "load-record start time", Time("MMDDhhmm"))
for n in range(1, 7):
    item(0x04000A01 + n, f"load_record_interval_{n}", f"load-record class {n} interval", Bcd(2), "min")
for n in range(1, 4):
    item(0x04000B00 | n, f"settlement_day_{n}", f"monthly settlement day {n}", Time("DDhh"))
item(0x04001001, "alarm_amount_1", "prepaid alarm amount 1 (verify)", ENERGY, "CNY")
item(0x04001002, "alarm_amount_2", "prepaid alarm amount 2 (verify)", ENERGY, "CNY")
item(0x04001003, "overdraft_limit", "prepaid overdraft limit (verify)", ENERGY, "CNY")
item(0x04001004, "hoarding_limit", "prepaid hoarding limit (verify)", ENERGY, "CNY")
item(0x04001005, "close_allowed_amount", "amount that allows closing (verify)", ENERGY, "CNY")
item(0x04001401, "trip_delay", "relay trip delay (verify)", Bcd(2), "min")

# --- prepaid (State Grid cost-control extension, verify) -----------------------------------------
item(0x00900100, "remaining_energy", "prepaid remaining energy (verify)", ENERGY, "kWh")
item(0x00900101, "overdraft_energy", "prepaid overdraft energy (verify)", ENERGY, "kWh")
item(0x00900200, "remaining_money", "prepaid remaining money (verify)", ENERGY, "CNY")
item(0x00900201, "overdraft_money", "prepaid overdraft money (verify)", ENERGY, "CNY")

# --- class 05 freezes: 05 KK II NN --------------------------------------------------------------
FREEZE_KINDS = {0x00: ("timed", 60), 0x01: ("instant", 3), 0x02: ("zone_switch", 2),
                0x03: ("slot_switch", 2), 0x05: ("price_switch", 2), 0x06: ("daily", 62),
                0x07: ("step_switch", 2)}
FREEZE_BLOCKS = {0x01: 0x01, 0x02: 0x02, 0x03: 0x03, 0x04: 0x04, 0x05: 0x05, 0x06: 0x06,
                 0x07: 0x07, 0x08: 0x08}  # II -> energy type TT
FREEZE_VARIABLES = (0x02030000, 0x02030100, 0x02030200, 0x02030300,
                    0x02040000, 0x02040100, 0x02040200, 0x02040300)
for kk, (kind, depth) in FREEZE_KINDS.items():
    for n in range(1, depth + 1):
        base = 0x05000000 | kk << 16 | n
        record = [base]
        item(base, f"{kind}_freeze_time_last{n}", f"{kind} freeze time", STAMP)
        for ii, tt in FREEZE_BLOCKS.items():
            what = ENERGY_TYPES[tt][0]
            item(base | ii << 8, f"{kind}_freeze_{what}_energy_last{n}", f"{kind} freeze {what} energy",
                 members=tuple(tt << 16 | rr << 8 for rr in range(TARIFFS + 1)))
            record.append(base | ii << 8)
        for ii, tt in ((0x09, 0x01), (0x0A, 0x02)):
            what = ENERGY_TYPES[tt][0]
            item(base | ii << 8, f"{kind}_freeze_{what}_max_demand_last{n}",
                 f"{kind} freeze {what} max demand",
                 members=tuple(0x01000000 | tt << 16 | rr << 8 for rr in range(TARIFFS + 1)))
            record.append(base | ii << 8)
        item(base | 0x1000, f"{kind}_freeze_power_last{n}", f"{kind} freeze powers",
             members=FREEZE_VARIABLES, fixed=True)
        record.append(base | 0x1000)
        item(base | 0xFF00, f"{kind}_freeze_last{n}", f"{kind} freeze, whole record", members=tuple(record),
             fixed=True)
for n in range(1, 255):  # hourly freezes keep only the time and the two active totals
    base = 0x05040000 | n
    item(base, f"hourly_freeze_time_last{n}", "hourly freeze time", STAMP)
    item(base | 0x0100, f"hourly_freeze_forward_active_energy_last{n}", "hourly freeze forward active",
         members=(0x00010000,), fixed=True)
    item(base | 0x0200, f"hourly_freeze_reverse_active_energy_last{n}", "hourly freeze reverse active",
         members=(0x00020000,), fixed=True)
    item(base | 0xFF00, f"hourly_freeze_last{n}", "hourly freeze, whole record",
         members=(base, base | 0x0100, base | 0x0200), fixed=True)

# --- class 06 load profile (verify): request forms; records are returned undecoded -----------------
item(0x06000000, "load_profile_oldest", "oldest N load-profile blocks (request + N)")
item(0x06000001, "load_profile_from", "N load-profile blocks from a time (request + N + mmhhDDMMYY)")
item(0x06000002, "load_profile_newest", "newest load-profile block")
for n in range(1, 7):
    item(0x06000000 | n << 16, f"load_profile_class_{n}", f"load-profile class {n} blocks (verify)")

# --- class 03 and State Grid 1D/1E event records (verify layouts) ---------------------------------
FIVE_ENERGIES = ("forward_active", "reverse_active", "q1_reactive", "q2_reactive", "q3_reactive",
                 "q4_reactive")


def _energies(prefix: str, when: str = "") -> tuple[Field, ...]:
    return tuple(Field(f"{prefix}_{e}_energy{when}", ENERGY, "kWh" if "active" in e else "kvarh")
                 for e in FIVE_ENERGIES)


RECORDS: tuple[tuple[int, str, tuple[Field, ...]], ...] = (
    (0x03110000, "power_down", (Field("power_down_start", MOMENT), Field("power_down_end", MOMENT))),
    (0x03300000, "programming", (Field("programming_time", MOMENT), Field("programming_operator", OPERATOR),
                                 *(Field(f"programming_di_{k}", Raw(4)) for k in range(1, 11)))),
    (0x03300100, "meter_clear", (Field("meter_clear_time", MOMENT), Field("meter_clear_operator", OPERATOR),
                                 *_energies("meter_clear"))),
    (0x03300300, "event_clear", (Field("event_clear_time", MOMENT), Field("event_clear_operator", OPERATOR),
                                 Field("event_clear_di", Raw(4)))),
    (0x03300400, "time_set", (Field("time_set_operator", OPERATOR), Field("time_set_before", MOMENT),
                              Field("time_set_after", MOMENT))),
    (0x03300D00, "cover_open", (Field("cover_open_start", MOMENT), Field("cover_open_end", MOMENT),
                                *_energies("cover_open", "_before"), *_energies("cover_open", "_after"))),
    (0x03300E00, "terminal_cover_open", (Field("terminal_cover_open_start", MOMENT),
                                         Field("terminal_cover_open_end", MOMENT),
                                         *_energies("terminal_cover_open", "_before"),
                                         *_energies("terminal_cover_open", "_after"))),
)
for base, event, fields in RECORDS:
    item(base, f"{event}_count", f"{event} count", COUNT3)
    for n in range(1, 11):
        item(base | n, f"{event}_record_last{n}", f"{event} record", fields=fields)
item(0x03300200, "demand_clear_count", "demand-clear count", COUNT3)

# Trip (1D) and close (1E) records, State Grid layout: 1Dxx II NN (verify).
RELAY_PARTS = ((0x01, "time", MOMENT, ""), (0x02, "operator", OPERATOR, ""),
               *((0x03 + k, f"{e}_energy", ENERGY, "kWh" if "active" in e else "kvarh")
                 for k, e in enumerate(FIVE_ENERGIES)))
for base, event in ((0x1D000000, "trip"), (0x1E000000, "close")):
    item(base | 0x0001, f"{event}_count", f"relay {event} count", COUNT3)
    for n in range(1, 11):
        for ii, part, fmt, unit in RELAY_PARTS:
            item(base | ii << 8 | n, f"{event}_{part}_last{n}", f"relay {event} {part}",
                 fields=(Field(f"{event}_{part}", fmt, unit),))
        item(base | 0xFF00 | n, f"{event}_record_last{n}", f"relay {event} record",
             members=tuple(base | ii << 8 | n for ii, *_ in RELAY_PARTS), fixed=True)

# --- DL/T 645-1997: 2-byte DIs, same quantity names as their 2007 equivalents ---------------------
for hi, tt, settle in ((0x901, 0x01, 0), (0x902, 0x02, 0), (0x941, 0x01, 1), (0x942, 0x02, 1)):
    kind = ENERGY_TYPES[tt][0]
    for rr in range(TARIFFS + 1):
        tariff = f"_t{rr}" if rr else ""
        item(hi << 4 | rr, f"{kind}_energy{tariff}{_suffix(settle)}", f"{kind} energy{tariff}", ENERGY,
             "kWh", edition=1997, equivalent=tt << 16 | rr << 8 | settle)
    item(hi << 4 | 0xF, f"{kind}_energy_block{_suffix(settle)}", f"{kind} energy block", edition=1997,
         members=tuple(hi << 4 | rr for rr in range(TARIFFS + 1)), equivalent=tt << 16 | 0xFF00 | settle)
V97: tuple[tuple[int, str, Format, str, int, bool], ...] = (
    (0x9110, "combined_reactive_1_energy", ENERGY, "kvarh", 0x00030000, False),
    (0x9120, "combined_reactive_2_energy", ENERGY, "kvarh", 0x00040000, False),
    (0xA010, "forward_active_max_demand", DEMAND, "kW", 0x01010000, False),
    (0xB010, "forward_active_max_demand_mdhm", Time("MMDDhhmm"), "", 0x01010000, False),
    (0xB210, "programming_time_mdhm", Time("MMDDhhmm"), "", 0x03300001, False),
    (0xB212, "programming_count", Bcd(2), "", 0x03300000, False),
    (0xB611, "voltage_a", Bcd(2, 0, real=True), "V", 0x02010100, True),
    (0xB621, "current_a", Bcd(2, 2), "A", 0x02020100, True),
    (0xB631, "active_power_a", Bcd(3, 4), "kW", 0x02030100, True),
    (0xB641, "reactive_power_a", Bcd(2, 2), "kvar", 0x02040100, True),
    (0xB651, "power_factor_a", Bcd(2, 3), "", 0x02060100, True),
    (0xC010, "date", Time("YYMMDDWW"), "", 0x04000101, False),
    (0xC011, "time", Time("hhmmss"), "", 0x04000102, False),
    (0xC020, "status_byte", Binary(1), "", 0x04000501, False),
    (0xC030, "active_constant", Bcd(3), "imp/kWh", 0x04000409, False),
    (0xC031, "reactive_constant", Bcd(3), "imp/kvarh", 0x0400040A, False),
    (0xC032, "meter_number", Digits(6), "", 0x04000402, False),
    (0xC033, "user_number", Digits(6), "", 0, False),
    (0xC034, "device_code", Digits(6), "", 0, False),
)
for di, name, fmt, unit, eq, phased in V97:
    if not phased:
        item(di, name, name.replace("_", " "), fmt, unit, edition=1997, equivalent=eq or None)
        continue
    stem = name[:-2]
    block = []
    if di & 0xFFF0 in (0xB630, 0xB640, 0xB650):  # these have a total at x0
        item(di - 1, stem, f"{stem} total", fmt, unit, edition=1997, equivalent=eq & 0xFFFF00FF)
        block.append(di - 1)
    for k, phase in enumerate(PHASES):
        item(di + k, f"{stem}_{phase}", f"phase {phase.upper()} {stem}", fmt, unit, edition=1997,
             equivalent=eq + (k << 8))
        block.append(di + k)
    item(di & 0xFFF0 | 0xF, f"{stem}_block", f"{stem} block", edition=1997, members=tuple(block),
         equivalent=eq & 0xFFFF00FF | 0xFF00, fixed=True)

# --- lookups ------------------------------------------------------------------------------------
TABLE_2007: dict[int, DataItem] = {i.di: i for i in ITEMS if i.edition == 2007}
TABLE_1997: dict[int, DataItem] = {i.di: i for i in ITEMS if i.edition == 1997}
BY_NAME: dict[int, dict[str, DataItem]] = {
    2007: {i.name: i for i in TABLE_2007.values()},
    1997: {i.name: i for i in TABLE_1997.values()},
}


def lookup(di: int, edition: int = 2007) -> DataItem | None:
    """The table row for a DI, or None for a DI the table does not know."""
    return (TABLE_1997 if edition == 1997 else TABLE_2007).get(di)


def find(item_name: str, edition: int = 2007) -> DataItem:
    """A row by quantity name or by DI in hex (`"00010000"`, `"9010"`); KeyError when unknown."""
    table = BY_NAME[1997 if edition == 1997 else 2007]
    found = table.get(item_name)
    if found is not None:
        return found
    text = item_name.strip().removeprefix("0x").removeprefix("0X")
    if len(text) == (4 if edition == 1997 else 8):
        try:
            di = int(text, 16)
        except ValueError:
            pass
        else:
            return lookup(di, edition) or DataItem(di, text.upper(), "unknown DI", edition=edition)
    raise KeyError(f"unknown data item {item_name!r} for DL/T 645-{edition}")
