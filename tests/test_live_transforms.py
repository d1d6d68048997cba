"""Every transform at once, live, against a real unbound.

The run happens in a private network namespace (tests/netns_scenario.py under
``unshare --net``) whose loopback carries public test addresses that MaxMind's
test databases know, so the receiver sees real clients with a country, a city
and an AS, not only 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, ReceiverProcess
import peers

pytestmark = pytest.mark.integration

GEOIP = REPO / "tests" / "data" / "geoip"
LONDON = "81.2.69.142"  # GB / London in GeoIP2-City-Test, in no AS of GeoLite2-ASN-Test
TELSTRA = "1.128.0.1"  # AS1221 Telstra Pty Ltd in GeoLite2-ASN-Test, in no city


def _require_namespaces() -> None:
    peers.require("unshare")
    peers.require("ip")
    if os.geteuid() != 0:
        message = "network namespaces need root"
        if peers.peers_required():
            pytest.fail(message + "; DNSTAP_REQUIRE_PEERS=1", pytrace=False)
        pytest.skip(message)


def test_all_transforms_on_real_unbound_traffic(tmp_path):
    _require_namespaces()
    peers.require("unbound")
    peers.require("dig")
    work = peers.short_socket_dir(tmp_path)
    blocklist = work / "blocked.txt"
    blocklist.write_text("# test list\n*.blocked.example.test\n")
    out = work / "out.json"
    spec = {
        "addresses": [f"{LONDON}/32", f"{TELSTRA}/32"],
        "config": {
            "output": {"file": {"enable": True, "format": "json", "file": str(out), "file-max-size": "100M"}},
            "normalize": {"qname-lowercase": True, "add-tld": True, "add-registrable-domain": True},
            "latency": {"enable": True, "timeout": 5.0, "unanswered": True},
            "filter": {
                "keep-message-types": ["CLIENT_QUERY", "CLIENT_RESPONSE"],
                "drop-domains-file": str(blocklist),
            },
            "geoip": {
                "enable": True,
                "city-database": str(GEOIP / "GeoIP2-City-Test.mmdb"),
                "asn-database": str(GEOIP / "GeoLite2-ASN-Test.mmdb"),
            },
            "privacy": {"anonymize-ip": True},
        },
        "queries": [
            [LONDON, "WWW.Example.TEST", "A"],
            [LONDON, "mail.example.test", "MX"],
            [TELSTRA, "api.example.test", "A"],
            [LONDON, "x.blocked.example.test", "A"],
        ],
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, str(REPO / "tests" / "netns_scenario.py"), str(work), str(spec_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((work / "result.json").read_text())
    assert result["statuses"] == ["NOERROR", "NOERROR", "NOERROR", "NXDOMAIN"]
    assert result["receiver_rc"] == 0, result["receiver_log"]

    records = ReceiverProcess.output_lines(out)
    # The blocked name is gone; everything else arrived once each way.
    assert sorted((r["message"], r["qname"]) for r in records) == sorted(
        (message, qname)
        for qname in ("www.example.test.", "mail.example.test.", "api.example.test.")
        for message in ("CLIENT_QUERY", "CLIENT_RESPONSE")
    )
    for rec in records:
        assert rec["tld"] == "test"
        assert rec["registrable-domain"] == "example.test"
        if rec["message"] == "CLIENT_RESPONSE":
            # unbound sends no query time: the latency comes from matching the query.
            assert isinstance(rec["latency"], float) and 0 <= rec["latency"] < 5
        # GeoIP saw the real client address; privacy then cut it to its /24.
        if rec["qname"] == "api.example.test.":
            assert (rec["country"], rec["city"]) == ("-", "-")
            assert (rec["asn"], rec["as-org"]) == ("AS1221", "Telstra Pty Ltd")
            assert rec["query-ip"] == "1.128.0.0"
        else:
            assert (rec["country"], rec["city"]) == ("United Kingdom", "London")
            assert (rec["asn"], rec["as-org"]) == ("-", "-")
            assert rec["query-ip"] == "81.2.69.0"
        assert rec["type"] != "unanswered"
