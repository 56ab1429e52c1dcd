"""`[prepaid]`: the remote fee control policy's switches and the defaults every account starts from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.plans import parse_duration
from gateway.prepaid.money import PrepaidError, format_money, parse_money

TOTAL = "forward_active_energy"
TARIFFS = ("forward_active_energy_t1", "forward_active_energy_t2", "forward_active_energy_t3",
           "forward_active_energy_t4")


class PrepaidConfig(BaseModel):
    """Thresholds are money in the currency unit; an account may override each of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    restore: Literal["close", "allow_close"] = "close"  # close: power back at once; allow_close: customer presses
    currency: str = Field(default="CNY", min_length=1, max_length=8)
    alarm_threshold: float = 20.0  # alarm when the balance falls to or below this
    trip_threshold: float = 0.0  # trip at or below this; negative = an overdraft limit
    restore_threshold: float = 0.0  # restore when a payment lifts the balance above this (exclusive)
    valid_for: float = Field(default=3600.0, gt=0)  # seconds a policy command stays valid
    retry_after: float = Field(default=1800.0, gt=0)  # s before a trip/restore that failed is issued again
    energy_quantity: str = TOTAL  # the total register, for a flat price
    tariff_quantities: tuple[str, str, str, str] = TARIFFS  # tariff 1..4 registers, for per-tariff prices

    @field_validator("valid_for", "retry_after", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("alarm_threshold", "trip_threshold", "restore_threshold")
    @classmethod
    def _money(cls, value: float) -> float:
        try:
            parse_money(value, "threshold")
        except PrepaidError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _order(self) -> PrepaidConfig:
        check_thresholds(self.fen("alarm_threshold"), self.fen("trip_threshold"), self.fen("restore_threshold"))
        return self

    def fen(self, name: str) -> int:
        """A default threshold in fen."""
        value: float = getattr(self, name)
        return parse_money(value, name)


def check_thresholds(alarm: int, trip: int, restore: int) -> None:
    """The order that keeps the policy from flapping: trip <= alarm and trip <= restore."""
    if trip > alarm:
        raise PrepaidError(f"trip threshold {format_money(trip)} is above the alarm threshold {format_money(alarm)}")
    if trip > restore:
        raise PrepaidError(f"trip threshold {format_money(trip)} is above the restore threshold "
                           f"{format_money(restore)}: a restored meter would trip again at once")
