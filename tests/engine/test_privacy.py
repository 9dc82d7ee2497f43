"""Phone numbers masked in every format people write them; the embedded Redis's files private."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from redis import Redis

from flowchat.logs import mask_phones
from flowchat.redis_server import RedisServer


@pytest.mark.parametrize(
    ("text", "region", "masked"),
    [
        ("call +44 20 7946 0958 now", "", "call +4420***0958 now"),
        ("+14155554567", "", "+1415***4567"),
        ("(415) 555-0123", "", "415***0123"),
        ("call 020 7946 0958 now", "GB", "call +4420***0958 now"),
        ("rappelle au 06 12 34 56 78 stp", "FR", "rappelle au +3361***5678 stp"),
        ("ligue (11) 91234-5678", "BR", "ligue +5511***5678"),
        ("00 44 20 7946 0958", "", "+4420***0958"),
        ("00 44 20 7946 0958", "US", "+4420***0958"),
        ("body: 'my number is 020 7946 0958, thanks'", "GB", "body: 'my number is +4420***0958, thanks'"),
    ],
)
def test_phone_numbers_are_masked_in_every_format(text: str, region: str, masked: str) -> None:
    assert mask_phones(text, region) == masked


@pytest.mark.parametrize(
    "text",
    [
        "order 123456789 shipped",
        "2026-11-30 10:31:35,123 INFO started",
        "execution 01a22c2f993f31442fc4c89d took 1234 ms",
        "amount 1234567.89 EUR",
        "timestamp 1701234567890",
    ],
)
def test_order_numbers_dates_and_ids_are_not_phone_numbers(text: str) -> None:
    assert mask_phones(text, "GB") == text


def test_masking_stays_cheap_on_ordinary_log_lines() -> None:
    line = "2026-11-30 10:31:35,123 INFO flowchat.execution 01a22c2f993f hello <- set {'name': 'ada', 'n': 3} in 2 ms"
    started = time.perf_counter()
    for _ in range(2000):
        mask_phones(line, "GB")
    per_line = (time.perf_counter() - started) / 2000
    assert per_line < 200e-6, f"{per_line * 1e6:.0f} us per line"


def test_the_embedded_redis_keeps_its_files_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "old.aof").write_text("written before the rule")
    (data / "old.aof").chmod(0o644)
    server = RedisServer(data).start()
    try:
        client = Redis.from_url(server.url)
        client.set("trigger", "+14155554567")
        client.execute_command("BGREWRITEAOF")
        time.sleep(0.3)
        client.close()
    finally:
        server.stop(force=True)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [path for path in data.rglob("*") if path.is_file() and not path.is_socket()]
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_cli_tables_mask_phone_numbers(tmp_path: Path) -> None:
    import subprocess
    import sys

    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "flow: p\ntrigger: {type: webhook}\nnodes:\n"
        '  - {id: s, type: set, with: {values: {phone: "{{ trigger.phone }}"}}}\n'
    )
    (tmp_path / "in.json").write_text('{"phone": "020 7946 0958"}')
    result = subprocess.run(
        [sys.executable, "-m", "flowchat.cli", "run", str(flow), "--input", str(tmp_path / "in.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "FLOWCHAT_DEFAULT_REGION": "GB"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "+4420***0958" in result.stdout
    assert "7946 0958" not in result.stdout
