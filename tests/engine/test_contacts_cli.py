"""`flowchat contacts` as users run it: a real process against a real Redis."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from pathlib import Path

import redis as sync_redis
from support import daemon_env, run_cli, stream_events

from flowchat.keys import Keys

KEYS = Keys("fc")


def contacts(redis_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("contacts", *args, env=daemon_env(redis_url), input=stdin, timeout=120)


def big_csv(path: Path, rows: int, bad_every: int) -> list[int]:
    """A CSV with ``rows`` data rows; returns the file lines of the bad ones (the header is line 1)."""
    bad_kinds = [
        "not-a-phone,Bad,,,",
        ",Empty,,,",
        "+1555,Short,,,",
        "+14155550000,Consent,,,maybe",
        "+14155550001,Cells,,,opted_in,extra,more",
        "+14155550002,Tag,a{b,,",
    ]
    bad_lines: list[int] = []
    with path.open("w", newline="") as out:
        out.write("phone,name,tags,groups,consent,attr.plan\n")
        for n in range(rows):
            line = n + 2
            if n % bad_every == bad_every - 1:
                out.write(bad_kinds[len(bad_lines) % len(bad_kinds)] + "\n")
                bad_lines.append(line)
            else:
                tags = "lead;vip" if n % 10 == 0 else "lead"
                out.write(f"+1 415 7{n:06d},Name {n},{tags},west,opted_in,plan-{n % 3}\n")
    return bad_lines


def test_import_10000_rows_reports_each_bad_line_and_is_idempotent(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    bad_lines = big_csv(path, 10_000, 270)
    assert len(bad_lines) == 37
    started = time.monotonic()
    first = contacts(redis_url, "import", str(path))
    took = time.monotonic() - started
    assert first.returncode == 1, first.stderr  # bad rows make it exit 1; the good ones are in
    reported = [int(line.split(":")[1]) for line in first.stderr.splitlines() if line.startswith(str(path))]
    assert reported == bad_lines
    assert "invalid phone number" in first.stderr and "consent must be one of" in first.stderr
    assert "7 cells but the header has 6 columns" in first.stderr
    assert "imported 9963 row(s): 9963 created, 0 updated, 0 unchanged; 37 bad row(s)" in first.stdout
    assert took < 30, f"import took {took:.1f}s"
    print(f"\nimport of 10,000 rows (37 bad): {took:.2f}s")
    client = sync_redis.Redis.from_url(redis_url)
    assert client.zcard(KEYS.contacts_all) == 9963
    events = client.xlen(KEYS.events)
    again = contacts(redis_url, "import", str(path))
    assert "imported 9963 row(s): 0 created, 0 updated, 9963 unchanged; 37 bad row(s)" in again.stdout
    assert client.zcard(KEYS.contacts_all) == 9963 and client.xlen(KEYS.events) == events  # nothing new
    assert client.scard(KEYS.contacts_tagged("vip")) == len([n for n in range(0, 10_000, 10) if n % 270 != 269])


def test_export_escapes_formulas_and_round_trips(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        "phone,name,tags,attr.note\n"
        '+14155550123,=HYPERLINK("http://evil"),vip;-danger,@SUM(A1)\n'
        "'+14155550124,Plain,vip,ok\n"
    )
    assert contacts(redis_url, "import", str(path)).returncode == 0
    exported = contacts(redis_url, "export", "--tag", "vip")
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.reader(io.StringIO(exported.stdout)))
    assert rows[0] == ["phone", "name", "tags", "groups", "consent", "attr.note"]
    assert rows[1] == ["'+14155550123", '\'=HYPERLINK("http://evil")', "'-danger;vip", "", "unknown", "'@SUM(A1)"]
    assert rows[2][0] == "'+14155550124" and rows[2][1] == "Plain"
    back = tmp_path / "back.csv"
    back.write_text(exported.stdout)
    again = contacts(redis_url, "import", str(back))
    assert "0 created, 0 updated, 2 unchanged" in again.stdout, again.stdout + again.stderr
    lines = contacts(redis_url, "export", "--format", "jsonl").stdout.splitlines()
    assert [json.loads(line)["phone"] for line in lines] == ["+14155550123", "+14155550124"]


def test_get_tag_search_erase_mask_phones_except_in_json(redis_url: str) -> None:
    tagged = contacts(redis_url, "tag", "whatsapp:+14155550123", "--add", "vip", "--add", "lead")
    assert tagged.returncode == 0 and "+1415***0123" in tagged.stdout and "4155550123" not in tagged.stdout
    removed = contacts(redis_url, "tag", "+14155550123", "--add", "vip", "--remove", "lead")
    assert "removed lead" in removed.stdout
    shown = contacts(redis_url, "get", "+14155550123")
    assert shown.returncode == 0 and "+1415***0123" in shown.stdout and "4155550123" not in shown.stdout
    assert "vip" in shown.stdout and "tag" in shown.stdout.split("last changes")[1]
    full = json.loads(contacts(redis_url, "get", "+14155550123", "--json").stdout)
    assert full["phone"] == "+14155550123" and full["tags"] == ["vip"] and len(full["audit"]) == 2
    table = contacts(redis_url, "search", "--tag", "vip")
    assert "+1415***0123" in table.stdout and "4155550123" not in table.stdout
    assert json.loads(contacts(redis_url, "search", "--tag", "vip", "--json").stdout)[0]["phone"] == "+14155550123"
    bad = contacts(redis_url, "get", "hello")
    assert bad.returncode == 1 and "[invalid-phone]" in bad.stderr and "Traceback" not in bad.stderr
    erased = contacts(redis_url, "erase", "+14155550123")
    assert erased.returncode == 0 and "erased +1415***0123" in erased.stdout
    assert contacts(redis_url, "get", "+14155550123").returncode == 1
    assert contacts(redis_url, "search", "--tag", "vip", "--json").stdout.strip() == "[]"
    client = sync_redis.Redis.from_url(redis_url)
    actions = [event["data"]["action"] for event in stream_events(client.xrange(KEYS.events))]
    assert actions[-1] == "erased"


def test_search_by_tag_over_100000_contacts_reads_the_index(redis_url: str) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for n in range(100_000):
        phone = f"+1415{n:07d}"
        fields = {"phone": phone, "name": f"N{n}", "created_at": n, "updated_at": n, "consent_state": "unknown"}
        tag = "rare" if n % 1000 == 7 else "common"
        pipe.hset(KEYS.contact(phone), mapping={**fields, f"t:{tag}": "1"})
        pipe.sadd(KEYS.contacts_tagged(tag), phone)
        pipe.zadd(KEYS.contacts_all, {phone: n})
        if n % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    client.config_resetstat()
    started = time.monotonic()
    found = contacts(redis_url, "search", "--tag", "rare", "--limit", "500", "--json")
    took = time.monotonic() - started
    assert found.returncode == 0, found.stderr
    phones = [contact["phone"] for contact in json.loads(found.stdout)]
    assert phones == sorted(f"+1415{n:07d}" for n in range(7, 100_000, 1000))
    stats = client.info("commandstats")
    assert "cmdstat_scan" not in stats and "cmdstat_keys" not in stats
    assert stats["cmdstat_hgetall"]["calls"] == 100  # only the matches were read
    print(f"\nsearch --tag over 100,000 contacts: {took:.2f}s (process start included)")
