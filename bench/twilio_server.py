"""A local Twilio-compatible API for the benchmark, in its own process (the tests' fake).

    python -m bench.twilio_server

Prints ``ready URL`` once listening; on SIGTERM prints ``{"posts": N}`` (Messages
create requests received) as JSON and exits.
"""

from __future__ import annotations

import asyncio
import json
import signal

from tests.twilio_fake import TwilioFake


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    fake = await TwilioFake.start()
    print(f"ready {fake.url}", flush=True)
    await stop.wait()
    posts = fake.posts
    await fake.stop()
    print(json.dumps({"posts": posts}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
