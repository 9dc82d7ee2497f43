"""``flowchat contacts``: get, import, export, search, tag and erase contacts.

Tables mask phone numbers (``+1415***0123``); ``--json`` and exports carry them in full.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from flowchat.contacts import CONSENT_STATES, Change, Contacts, applied_from_reply, contact_events
from flowchat.errors import FlowChatError
from flowchat.events import CLI, Events
from flowchat.listing import limit as listing_limit
from flowchat.phones import mask, normalize
from flowchat.settings import Settings, SettingsError

IMPORT_BATCH = 1000
COLUMNS = ("phone", "name", "tags", "groups", "consent")
FORMULA_STARTS = ("=", "+", "-", "@")


def add_commands(sub: Any) -> None:
    """Add the ``contacts`` family to the CLI (``sub`` is the top-level subparsers)."""
    p = sub.add_parser("contacts", help="the contact book: get, import, export, search, tag, erase")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("get", help="one contact: name, consent, tags, groups, attributes, last changes")
    a.add_argument("phone")
    a.add_argument("--json", action="store_true", help="print the contact as JSON (phone in full)")
    a = actions.add_parser("import", help="import a CSV: phone, then any of name,tags,groups,consent,attr.*")
    a.add_argument("file", metavar="FILE.csv")
    a = actions.add_parser("export", help="write contacts as CSV or JSON lines to stdout")
    a.add_argument("--tag", action="append", default=[], help="only contacts with this tag (repeatable)")
    a.add_argument("--group", action="append", default=[], help="only contacts in this group (repeatable)")
    a.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    a = actions.add_parser("search", help="contacts by tag, group and opt-out, from the indexes")
    a.add_argument("--tag", action="append", default=[], help="has this tag (repeatable: all of them)")
    a.add_argument("--group", action="append", default=[], help="in this group (repeatable: all of them)")
    a.add_argument("--opted-out", action="store_true", help="opted out of messages")
    a.add_argument("--limit", type=listing_limit, default=50, help="at most this many (default 50)")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("tag", help="add and remove tags of a contact (created if new)")
    a.add_argument("phone")
    a.add_argument("--add", action="append", default=[], metavar="TAG", help="tag to add (repeatable)")
    a.add_argument("--remove", action="append", default=[], metavar="TAG", help="tag to remove (repeatable)")
    a = actions.add_parser("erase", help="remove a contact, its indexes and audit trail (emits an erased event)")
    a.add_argument("phone")
    p.set_defaults(handler=contacts_command)


def contacts_command(args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[Contacts, argparse.Namespace], Any]] = {
        "get": _get,
        "import": _import,
        "export": _export,
        "search": _search,
        "tag": _tag,
        "erase": _erase,
    }
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def go() -> int:
        async with open_book(settings) as book:
            return int(await handlers[args.action](book, args))

    from redis.exceptions import RedisError

    try:
        return asyncio.run(go())
    except FlowChatError as exc:
        print(f"error: [{exc.code}] {exc.message}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(f"error: cannot reach Redis: {exc}", file=sys.stderr)
        return 1


@asynccontextmanager
async def open_book(settings: Settings) -> AsyncIterator[Contacts]:
    """The contact book on the configured Redis (or the embedded one), events flushed on exit."""
    from flowchat.daemon import operator_queue

    async with operator_queue() as queue:
        events = Events(queue.redis, queue.keys, enabled=settings.analytics)
        try:
            yield Contacts(queue.redis, queue.keys, default_region=settings.default_region, events=events)
        finally:
            await events.aclose()


# --- get, tag, erase ---------------------------------------------------------------------


async def _get(book: Contacts, args: argparse.Namespace) -> int:
    contact = await book.details(args.phone, audit=10)
    if contact is None:
        print(f"error: no contact {mask(book.phone(args.phone))}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(contact, indent=2, ensure_ascii=False))
        return 0
    consent = contact["consent"]
    print(f"phone       {mask(contact['phone'])}")
    print(f"name        {contact['name'] or '-'}")
    print(
        f"consent     {consent['state']}" + (f" ({consent['source']}, {_when(consent['at'])})" if consent["at"] else "")
    )
    print(f"tags        {', '.join(contact['tags']) or '-'}")
    print(f"groups      {', '.join(contact['groups']) or '-'}")
    print(f"created     {_when(contact['created_at'])}")
    print(f"updated     {_when(contact['updated_at'])}")
    print(f"last inbound {_when(contact['last_inbound_at'])}")
    print("attributes" + ("  -" if not contact["attributes"] else ""))
    for name, value in contact["attributes"].items():
        print(f"  {name:<18} {json.dumps(value, ensure_ascii=False)}")
    print("last changes")
    for entry in contact["audit"]:
        details = {k: v for k, v in entry.items() if k not in ("at", "action", "source")}
        source = f" [{entry['source']}]" if entry.get("source") else ""
        print(f"  {_when(entry['at'])}  {entry['action']}{source}  {json.dumps(details, ensure_ascii=False)}")
    return 0


async def _tag(book: Contacts, args: argparse.Namespace) -> int:
    if not args.add and not args.remove:
        print("error: give --add TAG and/or --remove TAG", file=sys.stderr)
        return 2
    applied = await book.tag(args.phone, add=args.add, remove=args.remove)
    print(
        f"{mask(applied.contact['phone'])}: tags {', '.join(applied.contact['tags']) or '-'}"
        f"  (added {', '.join(applied.tags_added) or '-'}; removed {', '.join(applied.tags_removed) or '-'})"
    )
    return 0


async def _erase(book: Contacts, args: argparse.Namespace) -> int:
    phone = book.phone(args.phone)
    if not await book.erase(phone):
        print(f"error: no contact {mask(phone)}", file=sys.stderr)
        return 1
    print(f"erased {mask(phone)}")
    return 0


# --- search and export -------------------------------------------------------------------


async def _search(book: Contacts, args: argparse.Namespace) -> int:
    phones = await book.search(tags=args.tag, groups=args.group, opted_out=args.opted_out, limit=max(args.limit, 1))
    found = await book.many(phones)
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0
    print(f"{'phone':<16} {'name':<24} {'consent':<10} tags")
    for contact in found:
        name = (contact["name"] or "-")[:24]
        print(f"{mask(contact['phone']):<16} {name:<24} {contact['consent']['state']:<10} {', '.join(contact['tags'])}")
    print(f"{len(found)} contact(s)", file=sys.stderr)
    return 0


async def _export(book: Contacts, args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.format == "jsonl":
        async for contact in book.iterate(tags=args.tag, groups=args.group):
            out.write(orjson.dumps(contact).decode() + "\n")
        return 0
    rows = [contact async for contact in book.iterate(tags=args.tag, groups=args.group)]
    write_csv(rows, out)
    return 0


def write_csv(contacts: list[dict[str, Any]], out: TextIO) -> None:
    """Contacts as CSV, cells that a spreadsheet would run as a formula escaped with ``'``."""
    attributes = sorted({name for contact in contacts for name in contact["attributes"]})
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, *(f"attr.{name}" for name in attributes)])
    for contact in contacts:
        cells = [
            contact["phone"],
            contact["name"] or "",
            ";".join(contact["tags"]),
            ";".join(contact["groups"]),
            contact["consent"]["state"],
            *(_cell(contact["attributes"].get(name)) for name in attributes),
        ]
        writer.writerow([escape_formula(cell) for cell in cells])


def escape_formula(cell: str) -> str:
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def unescape_formula(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


# --- import ------------------------------------------------------------------------------


@dataclass
class ImportReport:
    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)


async def _import(book: Contacts, args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    try:
        header, records = parse_csv(text)
    except ValueError as exc:
        print(f"error: {path}:1: {exc}", file=sys.stderr)
        return 2
    total = max(1, text.count("\n") - 1) if sys.stderr.isatty() else 0
    report = await import_rows(book, header, records, progress=total)
    for line, reason in report.bad:
        print(f"{path}:{line}: {reason}", file=sys.stderr)
    print(
        f"imported {report.rows} row(s): {report.created} created, {report.updated} updated, "
        f"{report.unchanged} unchanged; {len(report.bad)} bad row(s)"
    )
    return 1 if report.bad else 0


def parse_csv(text: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header (checked) and the records, each with the file line it starts on (header = 1)."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise ValueError("the file is empty; the first line must be a header starting with phone") from None
    if not header or header[0] != "phone":
        raise ValueError(f"the first column must be phone, not {header[0] if header else ''!r}")
    unknown = [name for name in header[1:] if name not in COLUMNS[1:] and not name.startswith("attr.")]
    if unknown or len(set(header)) != len(header):
        raise ValueError(f"unknown or repeated columns: {', '.join(unknown) or 'a repeated name'}")

    def records() -> Iterator[tuple[int, list[str]]]:
        line = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield line, [f"\0{exc}"]
                line = reader.line_num + 1
                continue
            yield line, cells
            line = reader.line_num + 1

    return header, records()


def row_change(header: list[str], cells: list[str], region: str) -> Change:
    """One CSV row as a change (tags and groups added, never removed: a re-import is idempotent)."""
    if len(cells) == 1 and cells[0].startswith("\0"):
        raise ValueError(f"unreadable CSV: {cells[0][1:]}")
    if len(cells) > len(header):
        raise ValueError(f"{len(cells)} cells but the header has {len(header)} columns")
    values = {name: unescape_formula(cell.strip()) for name, cell in zip(header, cells, strict=False)}
    if not values.get("phone"):
        raise ValueError("phone is empty")
    try:
        phone = normalize(values["phone"], region)
    except FlowChatError as exc:
        raise ValueError(exc.message) from None
    consent = values.get("consent") or None
    if consent is not None and consent not in CONSENT_STATES:
        raise ValueError(f"consent must be one of {', '.join(CONSENT_STATES)}, not {consent!r}")
    return Change(
        phone,
        "import",
        source="import",
        name=values.get("name") or None,
        attributes={name[5:]: value for name, value in values.items() if name.startswith("attr.") and value},
        tags_add=_split(values.get("tags", "")),
        groups_add=_split(values.get("groups", "")),
        consent=None if consent == "unknown" else consent,
    )


def _split(cell: str) -> list[str]:
    return [part.strip() for part in cell.split(";") if part.strip()]


async def import_rows(
    book: Contacts, header: list[str], records: Iterator[tuple[int, list[str]]], *, progress: int = 0
) -> ImportReport:
    """Apply valid rows in pipelined batches; collect bad ones with their line numbers.

    ``progress``: the number of rows expected, for a bar on stderr (0: no bar).
    """
    report = ImportReport()
    await book.redis.script_load(book._apply.script)
    batch: list[tuple[int, tuple[Any, ...]]] = []
    for line, cells in records:
        if not any(cell.strip() for cell in cells):
            continue  # blank lines are not rows
        try:
            keys, argv = book.command(row_change(header, cells, book.default_region))  # checks labels too
        except (ValueError, FlowChatError) as exc:
            report.bad.append((line, exc.message if isinstance(exc, FlowChatError) else str(exc)))
            continue
        batch.append((line, ("EVALSHA", book._apply.sha, len(keys), *keys, *argv)))
        if len(batch) >= IMPORT_BATCH:
            await _send(book, batch, report, progress)
            batch = []
    await _send(book, batch, report, progress)
    if progress:
        print(file=sys.stderr)
    return report


async def _send(book: Contacts, batch: list[tuple[int, tuple[Any, ...]]], report: ImportReport, progress: int) -> None:
    if not batch:
        return
    replies = await book.pipeliner.round_trip([command for _, command in batch])
    events = []
    for (line, _), reply in zip(batch, replies, strict=True):
        if isinstance(reply, Exception):
            report.bad.append((line, f"not stored: {reply}"))
            continue
        applied = applied_from_reply(reply)
        report.rows += 1
        if applied.created:
            report.created += 1
        elif applied.updated or applied.tags_added or applied.groups_added or applied.consent:
            report.updated += 1
        else:
            report.unchanged += 1
        events += contact_events(applied, CLI, "import")
    if book.events is not None:
        book.events.emit_many(events)
    if progress:
        done = min(progress, report.rows + len(report.bad))
        filled = round(30 * done / progress)
        bar = "#" * filled + "." * (30 - filled)
        print(f"\rimporting [{bar}] {done}/{progress} rows", end="", file=sys.stderr, flush=True)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
