"""A chat member that connects with tiny buffers and then never reads: the "stalled member".

It is a plain blocking socket that does the HTTP upgrade by hand, so no client library reads on
its behalf. At the end of a run it can drain what the server queued for it (bounded) and say
whether the server closed it, and with which code.
"""

from __future__ import annotations

import base64
import os
import socket
import time

STALLER_HANDSHAKE_TIMEOUT_S = 10.0
# On loopback (MSS 64 KiB) Linux sizes a new connection's send buffer to megabytes, which a few
# hundred KiB of fill would never exhaust. A stalled client announcing a 1 KiB MSS gets a server
# send buffer of tens of KiB instead, as a client on a real network path would.
STALLER_MSS = 1024


class StalledMember:
    """A raw-socket chat member that never reads after the handshake.

    It sets a small SO_RCVBUF and a 1 KiB TCP_MAXSEG before connecting, so that its own receive
    window and the server's send buffer for it stay small and fill within the fill phase.
    """

    def __init__(self, host: str, port: int, path: str, rcvbuf: int) -> None:
        """Remember where to connect; nothing happens until ``connect``."""
        self.host, self.port, self.path, self.rcvbuf = host, port, path, rcvbuf
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        """Connect (SO_RCVBUF and TCP_MAXSEG set first) and do the HTTP upgrade.

        Only the response head is consumed (peeked, then read to its exact length), so no
        WebSocket frame is ever read off the socket afterwards.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, STALLER_MSS)
        sock.settimeout(STALLER_HANDSHAKE_TIMEOUT_S)
        self.sock = sock
        sock.connect((self.host, self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        deadline = time.monotonic() + STALLER_HANDSHAKE_TIMEOUT_S
        while time.monotonic() < deadline:
            head = sock.recv(4096, socket.MSG_PEEK)
            if not head:
                raise ConnectionError("stalled member: server closed during the handshake")
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                head = sock.recv(end + 4)
                if not head.startswith(b"HTTP/1.1 101"):
                    raise ConnectionError(f"stalled member: handshake refused: {head[:40]!r}")
                return
            time.sleep(0.01)
        raise TimeoutError("stalled member: no handshake response")

    def drain_for_close(self, timeout: float = 3.0, max_bytes: int = 64 << 20) -> tuple[str, str]:
        """Read what the server queued (bounded); say how the connection ended, if it did.

        Returns a short verdict ("closed 1013", "still open", ...) and a detailed one.
        """
        if self.sock is None:
            return "not connected", "not connected"
        self.sock.settimeout(0.2)
        buf = bytearray()
        frames = 0
        read = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and read < max_bytes:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as exc:
                return "reset", f"reset after {frames} frames ({exc.__class__.__name__})"
            if not chunk:
                return "TCP closed, no close frame", f"TCP closed after {frames} frames"
            read += len(chunk)
            buf += chunk
            while True:
                parsed = parse_frame(buf)
                if parsed is None:
                    break
                opcode, payload, used = parsed
                del buf[:used]
                frames += 1
                if opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    return f"closed {code}", f"closed {code} after {frames - 1} frames"
        return "still open", f"still open ({frames} frames read in {timeout:.0f} s)"

    def close(self) -> None:
        """Close the raw socket."""
        if self.sock is not None:
            self.sock.close()


def parse_frame(buf: bytearray) -> tuple[int, bytes, int] | None:
    """Parse one unmasked server frame at the start of ``buf``: (opcode, payload, bytes used)."""
    if len(buf) < 2:
        return None
    opcode = buf[0] & 0x0F
    length = buf[1] & 0x7F
    pos = 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, pos = int.from_bytes(buf[2:4], "big"), 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, pos = int.from_bytes(buf[2:10], "big"), 10
    if len(buf) < pos + length:
        return None
    return opcode, bytes(buf[pos : pos + length]), pos + length
