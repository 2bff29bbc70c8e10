"""Query strings of the read routes: any text a client sends is a value or a 400, never a 500.

Every numeric parameter goes through :func:`whole_number`: ASCII digits only
(``str.isdigit()`` also takes "²" and "٣", which ``int()`` refuses or reads
otherwise), and no more of them than its largest value has, so ``int()`` never
meets a string over Python's 4,300-digit limit (which raised outside the 400
path: ``top=`` and 4,301 nines, or 5,000 zeros and a 5, answered 500).
"""

from __future__ import annotations

from sanic import Request
from sanic.request import RequestParameters

from core.buckets import WINDOWS
from core.events import is_account_id
from service.errors import BadRequest, client_input

DIGITS = frozenset("0123456789")


def query_args(request: Request) -> RequestParameters:
    """The query string's parameters, blank ones kept ("top=" is a mistake, not a default)."""
    with client_input("the query string"):
        return request.get_args(keep_blank_values=True)


def whole_number(text: str, name: str, low: int, high: int) -> int:
    """``text`` as a whole number in ``[low, high]`` written in at most as many ASCII digits
    as ``high`` has, or a 400 naming the parameter."""
    if not (
        0 < len(text) <= len(str(high)) and DIGITS.issuperset(text) and low <= int(text) <= high
    ):
        raise BadRequest(f"{name} must be a whole number from {low} to {high}", field=name)
    return int(text)


def check_account(account: str | None) -> str:
    if not account or not is_account_id(account):
        raise BadRequest("account_id must be 1..64 characters of A-Z a-z 0-9 _ . : -",
                         field="account_id")  # fmt: skip
    return account


def check_window(window: str | None) -> str:
    if window is None or window not in WINDOWS:
        raise BadRequest(f"window must be one of {', '.join(WINDOWS)}", field="window")
    return window
