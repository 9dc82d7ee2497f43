"""The CRM rows: examples/crm.yaml end to end (outbox and Twilio), accept → send latency, cost, contacts."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.harness import Bench


def run_crm(bench: Bench) -> None:
    bench.results["crm_skipped"] = "waiting for the CRM and WhatsApp work on main"
