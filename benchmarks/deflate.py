"""permessage-deflate for broadcasts: what compressing a chat message once costs, what it saves.

A broadcast frame built once and written to every member can only be compressed once if no
member's compressor carries context from earlier messages (``server_no_context_takeover``): a
fresh raw deflate stream per publication (zlib, raw: negative wbits; memLevel 5; flushed with
Z_SYNC_FLUSH and the trailing ``00 00 ff ff`` removed, RFC 7692 section 7.2.1). This module
times exactly that with ``time.perf_counter`` over many iterations, for a 64-byte and a 4 KiB
chat message at wbits -12 and -15, next to the bytes it saves per delivery and what every
receiver then pays to inflate it.

Run alone: ``python benchmarks/deflate.py``.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

PREFIX = b"Client says: "
TAIL = b"\x00\x00\xff\xff"
MEM_LEVEL = 5
WBITS = (12, 15)
MEMBERS = 1000
BATCHES = 5
SAMPLES = 16  # different messages per size, taken in turn
SYLLABLES = [a + b for a in "bcdfghklmnprstvw" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
VOCABULARY = 500


def _words(rng: random.Random) -> tuple[list[str], list[float]]:
    """Return a vocabulary of pseudo-words and Zipf weights (frequent short words first)."""
    words = sorted(
        {"".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(VOCABULARY * 2)},
        key=lambda w: (len(w), w),
    )[:VOCABULARY]
    return words, [1 / (rank + 1) for rank in range(len(words))]


def chat_text(size: int, seed: int = 7) -> bytes:
    """Return a deterministic chat-like message of exactly ``size`` bytes.

    Words follow a Zipf distribution over a 500-word vocabulary, roughly like prose. Small sizes
    are one sentence; larger ones a JSON list of chat events (what apps send in bulk).
    """
    words, weights = _words(random.Random(0))  # one language for every message
    rng = random.Random(seed)

    def sentence(n: int) -> str:
        return " ".join(rng.choices(words, weights, k=n))

    if size <= 200:
        text = ""
        while len(text) < size:
            text += sentence(4) + " "
        return text.encode()[:size]
    events: list[dict[str, object]] = []
    while len(json.dumps(events)) < size:
        n = len(events)
        user = f"user{rng.randint(1, 40)}"
        events.append({"id": 1000 + n, "user": user, "text": sentence(rng.randint(3, 14))})
    return json.dumps(events).encode()[:size]


def compress_once(payload: bytes, wbits: int) -> bytes:
    """Compress one message as a fresh raw deflate stream (no context takeover)."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -wbits, MEM_LEVEL)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4] if data.endswith(TAIL) else data


def compress_in_context(compressor: zlib._Compress, payload: bytes) -> bytes:
    """Compress one message on a long-lived per-connection compressor (context takeover)."""
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4] if data.endswith(TAIL) else data


def inflate(data: bytes, wbits: int) -> bytes:
    """Inflate one message as a receiver would (fresh decompressor, tail put back)."""
    d = zlib.decompressobj(-wbits)
    return d.decompress(data + TAIL)


def time_per_call(fn: Callable[[], object], min_batch_s: float) -> float:
    """Return the median time of one ``fn()`` call, in seconds.

    The iteration count is calibrated so that each of BATCHES batches lasts ``min_batch_s``.
    """
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_batch_s / 4:
            break
        n *= 4
    per_batch = []
    for _ in range(BATCHES):
        t0 = time.perf_counter()
        for _ in range(n * 4):
            fn()
        per_batch.append((time.perf_counter() - t0) / (n * 4))
    return float(statistics.median(per_batch))


@dataclass
class DeflateRow:
    """One message size and window: sizes, times, memory."""

    label: str
    wire: int  # frame payload uncompressed ("Client says: " + message)
    wbits: int
    compressed: int
    compress_us: float
    per_conn_us: float
    inflate_us: float

    @property
    def saved(self) -> int:
        """Return the bytes saved per delivery (negative: compression made it bigger)."""
        return self.wire - self.compressed

    @property
    def compressor_kib(self) -> float:
        """Return zlib's deflate state size for these settings (zconf.h formula), in KiB."""
        return ((1 << (self.wbits + 2)) + (1 << (MEM_LEVEL + 9))) / 1024

    @property
    def inflater_kib(self) -> float:
        """Return zlib's inflate window for these settings (1 << wbits, plus ~7 KiB), in KiB."""
        return ((1 << self.wbits) + 7 * 1024) / 1024


def run_deflate(min_batch_s: float = 0.05) -> list[DeflateRow]:
    """Measure every (message size, wbits) case, each over SAMPLES different messages."""
    rows = []
    for label, size in (("64 B", 64), ("4 KiB", 4096)):
        texts = [PREFIX + chat_text(size, seed) for seed in range(SAMPLES)]
        for wbits in WBITS:
            packed = [compress_once(t, wbits) for t in texts]
            if any(inflate(p, wbits) != t for p, t in zip(packed, texts, strict=True)):
                raise RuntimeError("deflate round trip failed")
            kept = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -wbits, MEM_LEVEL)
            plain, squeezed = itertools.cycle(texts), itertools.cycle(packed)
            once = time_per_call(lambda p=plain, b=wbits: compress_once(next(p), b), min_batch_s)
            # A member's own stream carries different messages in turn (the same text over and
            # over would compress to one back-reference).
            in_context = time_per_call(
                lambda c=kept, p=plain: compress_in_context(c, next(p)), min_batch_s
            )
            receive = time_per_call(lambda s=squeezed, b=wbits: inflate(next(s), b), min_batch_s)
            rows.append(
                DeflateRow(
                    label,
                    round(statistics.mean(len(t) for t in texts)),
                    wbits,
                    round(statistics.mean(len(p) for p in packed)),
                    once * 1e6,
                    in_context * 1e6,
                    receive * 1e6,
                )
            )
    return rows


DEFLATE_HEADER = (
    "message",
    "wbits",
    "payload bytes",
    "compressed",
    "saved per delivery",
    "compress once (µs)",
    f"… per delivery at {MEMBERS:,} members (µs)",
    "compress per member instead (µs per delivery)",
    "inflate, each receiver (µs)",
    "zlib state per connection if kept (KiB, deflate + inflate)",
)


def deflate_rows(rows: list[DeflateRow]) -> list[list[str]]:
    """Return the table rows for the report."""
    return [
        [
            r.label,
            f"-{r.wbits}",
            f"{r.wire:,}",
            f"{r.compressed:,}",
            f"{r.saved:,} B ({r.saved / r.wire * 100:.0f} %)",
            f"{r.compress_us:.1f}",
            f"{r.compress_us / MEMBERS:.3f}",
            f"{r.per_conn_us:.1f}",
            f"{r.inflate_us:.1f}",
            f"{r.compressor_kib:.0f} + {r.inflater_kib:.0f}",
        ]
        for r in rows
    ]


def main() -> None:
    """Print the table."""
    rows = deflate_rows(run_deflate())
    print(" | ".join(DEFLATE_HEADER))
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
