"""Micro-benchmark: which JSON library writes the service's response bodies fastest.

service/responses.py encodes every response with ``msgspec.json.Encoder().encode``. This
times that against ``ujson.dumps(...).encode()`` and stdlib ``json.dumps(...).encode()``
(both need the ``.encode()``: Sanic sends bytes) on three typical bodies:

- queued: the 202 reply to an accepted batch, ``{"status": "queued", "count": 100}``;
- error: a 422 validation error with 50 problem dicts (the most the validator reports);
- summary: a 24 h account summary with per-type totals and the top 100 users.

Each case is timed with ``timeit`` (5 repeats, best one kept) and printed as ns/op with
the ratio to msgspec. No servers needed: ``python -m scripts.bench_json``.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from typing import Any

import msgspec
import ujson

REPEATS = 5
TARGET_SECONDS = 0.2  # per repeat

Encoder = Callable[[Any], bytes]

_msgspec_encode = msgspec.json.Encoder().encode


def encoders() -> dict[str, Encoder]:
    return {
        "msgspec": _msgspec_encode,
        "ujson": lambda body: ujson.dumps(body).encode(),
        "json": lambda body: json.dumps(body).encode(),
    }


def bodies() -> dict[str, Any]:
    error = {
        "error": "validation_failed",
        "message": "the batch was rejected; nothing was queued",
        "details": [
            {"index": i, "field": "timestamp", "message": "more than 300 s in the future"}
            for i in range(50)
        ],
    }
    types = ("page_view", "click", "signup", "purchase", "logout")
    summary = {
        "account_id": "acct_0042",
        "window": "24h",
        "from": "2025-06-01T12:00:00Z",
        "to": "2025-06-02T12:00:00Z",
        "total": 1_234_567,
        "totals": {t: 1_234_567 // (i + 2) for i, t in enumerate(types)},
        "unique_users": 48_213,
        "top_users": [{"user_id": f"user_{i:05d}", "events": 10_000 - 37 * i} for i in range(100)],
        "as_of": "2025-06-02T12:00:05.123Z",
    }
    return {"queued": {"status": "queued", "count": 100}, "error": error, "summary": summary}


def best_ns_per_op(encode: Encoder, body: Any) -> float:
    timer = timeit.Timer("encode(body)", globals={"encode": encode, "body": body})
    number, elapsed = timer.autorange()
    number = max(1, int(number * TARGET_SECONDS / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=REPEATS, number=number)) / number * 1e9


def table() -> str:
    libs = encoders()
    rows = ["| body | bytes | " + " | ".join(f"{name} ns/op" for name in libs)]
    rows[0] += " | " + " | ".join(f"{name}/msgspec" for name in libs if name != "msgspec") + " |"
    rows.append("|---|---:|" + "---:|" * (2 * len(libs) - 1))
    for name, body in bodies().items():
        outputs = {lib: encode(body) for lib, encode in libs.items()}
        assert all(json.loads(out) == body for out in outputs.values()), name
        ns = {lib: best_ns_per_op(encode, body) for lib, encode in libs.items()}
        cells = [f"{ns[lib]:,.0f}" for lib in libs]
        cells += [f"{ns[lib] / ns['msgspec']:.2f}x" for lib in libs if lib != "msgspec"]
        rows.append(f"| {name} | {len(outputs['msgspec'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    print(table())


if __name__ == "__main__":
    main()
