"""Container health check: is the receiver's HTTP API answering?

Asks ``URL`` (default http://127.0.0.1:8080/counters) without credentials:
the API answers 401 with its realm, which proves the process is up and
serving without this script knowing the api-key. Exit 0 healthy, 1 not (no answer, or an answer
that is not the API's). Standard library only: it runs in the image as is.

    python healthcheck.py [URL]
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080/counters"
TIMEOUT = 4.0  # under the HEALTHCHECK --timeout
REALM = 'realm="dnstap-receiver"'  # pipeline/http_api.py REALM


def check(url: str = DEFAULT_URL) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT):
            return False  # the API never serves an anonymous request: not the receiver
    except urllib.error.HTTPError as exc:
        # The API refusing an anonymous request, with its own realm: alive.
        return exc.code == 401 and REALM in (exc.headers.get("WWW-Authenticate") or "")
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(0 if check(*sys.argv[1:2]) else 1)
