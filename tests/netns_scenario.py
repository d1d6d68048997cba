"""A live run inside a private network namespace (started with ``unshare --net``).

The namespace has only ``lo``; the scenario gives it the addresses listed in the
spec (public test addresses that MaxMind's test databases know), starts the
receiver with the spec's configuration and a real unbound answering every local
address, sends the spec's queries with dig from the given source addresses, then
stops unbound and the receiver. What happened is written to ``result.json`` in
the work directory; the calling test reads the receiver's output files.

    unshare --net -- python tests/netns_scenario.py WORKDIR SPEC.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import peers  # noqa: E402
from conftest import start_receiver  # noqa: E402


def main(workdir: Path, spec: dict) -> dict:
    ip = peers.require("ip")
    subprocess.run([ip, "link", "set", "lo", "up"], check=True)
    for address in spec["addresses"]:
        subprocess.run([ip, "addr", "add", address, "dev", "lo"], check=True)

    sock = workdir / "dnstap.sock"
    config = dict(spec["config"])
    config.setdefault("input", {})["unix-socket"] = {"enable": True, "path": str(sock)}
    receiver = start_receiver(workdir / "receiver", config)
    port = peers.free_port(udp_too=True)
    unbound = peers.start_unbound(workdir / "unbound", port, f"unix:{sock}", any_client=True)
    statuses = [
        peers.dig(port, qname, qtype, host=source, source=source)
        for source, qname, qtype in spec["queries"]
    ]
    unbound_rc = peers.stop_unbound(unbound)
    receiver_rc = receiver.stop()
    return {"statuses": statuses, "unbound_rc": unbound_rc, "receiver_rc": receiver_rc,
            "receiver_log": receiver.logs()[-4000:]}


if __name__ == "__main__":
    work = Path(sys.argv[1])
    result = main(work, json.loads(Path(sys.argv[2]).read_text()))
    (work / "result.json").write_text(json.dumps(result))
