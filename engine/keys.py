"""Every Redis key FlowChat uses, in one place.

All keys of one queue share the hash tag ``{<prefix>}`` so every multi-key
Lua script and MULTI stays in one slot, and the same code runs on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROUP = "workers"
"""The consumer group every worker reads the ready stream through."""

EVENTS_GROUP = "analytics"
"""The consumer group analytics reads the events stream through (trimming waits for it)."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one queue (one partition)."""

    prefix: str = "fc"
    tag: str = field(init=False, repr=False, compare=False)
    """``{<prefix>}``: the hash tag of the queue's own keys."""
    contacts_tag: str = field(init=False, repr=False, compare=False)
    """``{<prefix>:contacts}``: every contact key shares it, so a contact and its indexes change in one script."""
    ledger_tag: str = field(init=False, repr=False, compare=False)
    """``{<prefix>:wa}``: the hash tag of the WhatsApp message ledger."""

    def __post_init__(self) -> None:  # the tags are in every key: built once, not per key
        object.__setattr__(self, "tag", f"{{{self.prefix}}}")
        object.__setattr__(self, "contacts_tag", f"{{{self.prefix}:contacts}}")
        object.__setattr__(self, "ledger_tag", f"{{{self.prefix}:wa}}")

    @property
    def ready(self) -> str:
        """Stream of executions ready to run (entries: ``e`` = execution id)."""
        return f"{self.tag}:ready"

    @property
    def delayed(self) -> str:
        """Sorted set of waiting execution ids, scored by wake-up time (epoch s)."""
        return f"{self.tag}:delayed"

    @property
    def dead(self) -> str:
        """Stream of dead letters: execution id, flow, node, code, message."""
        return f"{self.tag}:dead"

    def index(self, flow: str, status: str) -> str:
        """Sorted set of the ids of one flow's executions in one status, scored by creation time.

        Each execution is in exactly one of these (the scripts that change its status move it), so
        every filter of ``executions list`` (flow, status, both, none) reads only what it shows,
        for one index entry per execution.
        """
        return f"{self.tag}:executions:{status}:{flow}"

    @property
    def indexed_flows(self) -> str:
        """Set of the flow names that have executions in an :meth:`index` (listing and retention read it)."""
        return f"{self.tag}:executions:flows"

    @property
    def legacy_index(self) -> str:
        """Sorted set of every execution id (before the per-status indexes): moved into them at start-up."""
        return f"{self.tag}:executions"

    def legacy_flow_index(self, flow: str) -> str:
        """Sorted set of one flow's execution ids (before the per-status indexes): deleted once moved."""
        return f"{self.tag}:executions:flow:{flow}"

    @property
    def counters(self) -> str:
        """Hash of cluster-wide counters: ``<event>:<flow>`` → count."""
        return f"{self.tag}:counters"

    def execution(self, execution_id: str) -> str:
        """Hash of one execution: ``m`` fixed meta JSON, ``s`` changing state JSON, ``n:<node>`` node JSON,
        ``d`` deliveries, ``c`` cancel flag; once succeeded, the compact form ``z``, ``f``, ``t``, ``n:<node>``
        (see :mod:`flowchat.codec`)."""
        return f"{self.tag}:x:{execution_id}"

    def dedupe(self, idempotency_key: str) -> str:
        """String: the execution id first accepted for a trigger's idempotency key."""
        return f"{self.tag}:dedupe:{idempotency_key}"

    def flow_source(self, flow: str, version: str) -> str:
        """String: the YAML of one flow version, so executions finish on it after a reload."""
        return f"{self.tag}:flow:{flow}:{version}"

    def schedule_last(self, flow: str) -> str:
        """String: the last schedule tick fired for ``flow`` (epoch s)."""
        return f"{self.tag}:schedule:{flow}"

    # --- crm: contacts, limiter, events (each under its own hash tag) -----------------------

    def contact(self, phone: str) -> str:
        """Hash of one contact (E.164): name, times, consent_*, ``a:<attr>`` JSON, ``t:<tag>``, ``g:<group>``."""
        return f"{self.contacts_tag}:c:{phone}"

    def contact_audit(self, phone: str) -> str:
        """List of a contact's last 100 changes (JSON entries, newest first)."""
        return f"{self.contacts_tag}:audit:{phone}"

    @property
    def contacts_all(self) -> str:
        """Sorted set of every contact's phone, scored by creation time (epoch ms)."""
        return f"{self.contacts_tag}:all"

    @property
    def contacts_opted_out(self) -> str:
        """Set of the phones of opted-out contacts."""
        return f"{self.contacts_tag}:opted-out"

    def contacts_tagged(self, tag: str) -> str:
        """Set of the phones carrying ``tag`` (the index ``contacts search --tag`` reads)."""
        return f"{self.contacts_tag}:tag:{tag}"

    def contacts_grouped(self, group: str) -> str:
        """Set of the phones in ``group``."""
        return f"{self.contacts_tag}:group:{group}"

    def contact_inbound(self, message_sid: str) -> str:
        """String: an inbound message already recorded on its contact (idempotency, 7 days)."""
        return f"{self.contacts_tag}:inbound:{message_sid}"

    def limit(self, key: str) -> str:
        """String: the GCRA theoretical arrival time (epoch µs) of one rate-limit key."""
        return f"{{{self.prefix}:limits}}:tat:{key}"

    def limit_reservation(self, key: str, holder: str) -> str:
        """String: the slot (epoch µs) reserved for ``holder`` on a rate-limit key, while it waits."""
        return f"{{{self.prefix}:limits}}:res:{key}:{holder}"

    @property
    def events(self) -> str:
        """Stream of events (execution, node_run, metric, contact, message) for analytics."""
        return f"{{{self.prefix}:events}}:stream"

    # --- whatsapp: message ledger ----------------------------------------------------------
    # One hash tag for the ledger, so a send's record (message hash, send marker, index) is
    # written by one script in one slot.


    def message(self, sid: str) -> str:
        """Hash of one WhatsApp message: sid, direction, to, from, status, error, flow, execution, node."""
        return f"{self.ledger_tag}:m:{sid}"

    @property
    def messages(self) -> str:
        """Sorted set of every message sid in the ledger, scored by creation time (epoch ms)."""
        return f"{self.ledger_tag}:messages"

    def send_record(self, execution_id: str, node_id: str) -> str:
        """String: the sid one ``whatsapp.send`` node of one execution got, so it never sends twice."""
        return f"{self.ledger_tag}:sent:{execution_id}:{node_id}"

    # --- analytics: sink lease -------------------------------------------------------------

    @property
    def sink_lease(self) -> str:
        """String: the id of the one active analytics sink, with a TTL it keeps renewing."""
        return f"{{{self.prefix}:events}}:sink-lease"

    # --- hostile input: readiness probe ----------------------------------------------------

    @property
    def ready_probe(self) -> str:
        """String: written by ``/readyz`` (short TTL) to prove Redis accepts writes."""
        return f"{self.tag}:readyz"
