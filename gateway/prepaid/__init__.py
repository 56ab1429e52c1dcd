"""Prepaid policy (remote fee control): accounts, balances, payments, estimates from energy readings,
and the alarm / trip / restore commands they call for, carried out by gateway.control."""

from gateway.prepaid.config import PrepaidConfig
from gateway.prepaid.ledger import Settings
from gateway.prepaid.money import Conflict, PrepaidError, UnknownAccount, UnknownMeter
from gateway.prepaid.policy import Prepaid

__all__ = ["Conflict", "Prepaid", "PrepaidConfig", "PrepaidError", "Settings", "UnknownAccount", "UnknownMeter"]
