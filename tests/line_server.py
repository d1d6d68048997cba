"""A TCP server that appends everything it receives to a file: the remote end
of the TCP output in tests, run as its own process so that a test can kill it.

    python tests/line_server.py PORT FILE
"""

from __future__ import annotations

import socket
import sys
import threading


def serve(conn: socket.socket, path: str, lock: threading.Lock) -> None:
    """Appends the connection's complete lines: lines of several connections
    (one per worker process of a replay) never interleave in the file."""
    pending = b""
    with conn:
        while True:
            data = conn.recv(1 << 16)
            if not data:
                return
            pending += data
            cut = pending.rfind(b"\n") + 1
            if cut:
                with lock, open(path, "ab") as out:
                    out.write(pending[:cut])
                pending = pending[cut:]


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    server = socket.create_server(("127.0.0.1", port), reuse_port=False)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lock = threading.Lock()
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn, path, lock), daemon=True).start()


if __name__ == "__main__":
    main()
