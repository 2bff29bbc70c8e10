"""The k6 verifier must catch every way a run can go wrong (pure, no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from scripts.k6_verify import Sent, Verdict, check_storage, figures_from, read_k6_output

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def point(batch: str, size: int, outcome: str) -> dict[str, Any]:
    tags = {"batch": batch, "outcome": outcome}
    return {"metric": "batch_outcome", "type": "Point", "data": {"value": size, "tags": tags}}


def docs_for(batch: str, indexes: range) -> list[dict[str, Any]]:
    return [
        {"event_id": f"{batch}.{i}", "account_id": "a", "user_id": f"u{i % 2}", "type": "login",
         "timestamp": T0 + timedelta(seconds=i)}
        for i in indexes
    ]  # fmt: skip


def problems(sent: Sent, docs: list[dict[str, Any]]) -> list[str]:
    verdict = Verdict(sent=sent)
    check_storage(sent, docs, verdict)
    return verdict.problems


def test_reads_batch_outcomes_from_k6_json(tmp_path: Path) -> None:
    lines = [
        {"metric": "http_reqs", "type": "Point", "data": {"value": 1, "tags": {}}},
        {"metric": "batch_outcome", "type": "Metric", "data": {"name": "batch_outcome"}},
        point("r-1", 10, "accepted"),
        point("r-2", 5, "shed"),
    ]
    path = tmp_path / "k6.json"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    sent = read_k6_output(path)
    assert sent.batches == {"r-1": (10, "accepted"), "r-2": (5, "shed")}
    assert sent.events("accepted") == 10 and sent.count("shed") == 1


def test_a_clean_run_has_no_problems() -> None:
    sent = Sent({"b1": (3, "accepted"), "b2": (2, "shed"), "b3": (2, "unknown")})
    assert problems(sent, docs_for("b1", range(3)) + docs_for("b3", range(2))) == []


def test_lost_doubled_leaked_partial_and_unsent_events_are_all_reported() -> None:
    sent = Sent(
        {
            "lost": (3, "accepted"),
            "shed": (2, "shed"),
            "half": (4, "unknown"),
            "ok": (1, "accepted"),
        }
    )
    docs = (
        docs_for("lost", range(2))
        + docs_for("shed", range(1))
        + docs_for("half", range(2))
        + docs_for("ok", range(1)) * 2
        + docs_for("ghost", range(1))
    )
    found = " | ".join(problems(sent, docs))
    assert "1 events stored more than once" in found
    assert "1 stored batches k6 never sent" in found
    assert "1 events answered 202 are not stored" in found
    assert "1 events of refused/shed batches were stored" in found
    assert "1 batches with unknown outcome were stored partially" in found


def test_figures_count_only_the_window() -> None:
    docs = docs_for("b", range(10))
    figures = figures_from(docs, T0 + timedelta(seconds=2), T0 + timedelta(seconds=5), top=1)
    assert figures == {
        "total": 3,
        "totals": {"login": 3},
        "unique_users": 2,
        "top_users": [{"user_id": "u0", "events": 2}],
    }
