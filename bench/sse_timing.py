#!/usr/bin/env python3
"""Times streamed chat completions through two proxies, event by event.

    python3 bench/sse_timing.py --plain 127.0.0.1:9102 \
        --metered 127.0.0.1:9103 --streams 200 --keys 1000

For each of --streams rounds it sends one streamed request through the
plain proxy and one through the metered proxy (the order alternates from
round to round), each on its own keep-alive connection, and notes when
every SSE event arrives, in nanoseconds from the moment the request was
sent.  The usage-only event (`"choices":[]`) is left out of the
comparison, because the metered proxy takes it out of the stream when
the client did not ask for usage, as this client does not.

It prints medians as JSON (with --json) or as text:

- ttfb: from sending the request to the first complete event;
- offset[i]: when event i arrived; the median over streams per event;
- added_per_chunk: for each event, median metered offset minus median
  plain offset, less the same difference for the first event; the median
  of that over the events is the delay the meter adds to a chunk on top
  of what it adds before the first byte;
- gap: the time between consecutive events, median over all of them.

Only the Python standard library is used.
"""

import argparse
import json
import random
import socket
import statistics
import sys
import time


BODY = (b'{"model":"bench","stream":true,"messages":[{"role":"user",'
        b'"content":"Stream a greeting to the benchmark."}]}')


class StreamError(Exception):
    pass


class Conn:
    """One keep-alive HTTP/1.1 connection that reads chunked SSE answers."""

    def __init__(self, host, port, timeout):
        self.addr = (host, port)
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def connect(self):
        self.close()
        self.sock = socket.create_connection(self.addr, self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise StreamError("connection closed by the server")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def stream(self, key):
        """Sends one request; returns [(ns since send, event bytes)]."""
        if self.sock is None:
            self.connect()

        req = (b"POST /v1/chat/completions HTTP/1.1\r\n"
               b"Host: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\n"
               b"X-Bench-Stream: 1\r\n"
               b"Authorization: Bearer " + key.encode() + b"\r\n"
               b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
               b"\r\n" + BODY)

        start = time.perf_counter_ns()
        self.sock.sendall(req)

        status = self._line()
        if not status.startswith(b"HTTP/1.1 200"):
            raise StreamError("unexpected status: %r" % status)

        chunked = False
        close = False

        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"transfer-encoding" and value == b"chunked":
                chunked = True
            if name == b"connection" and value == b"close":
                close = True

        if not chunked:
            raise StreamError("the answer is not chunked")

        events = []
        pending = b""

        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                self._line()
                break

            data = self._exact(size)
            self._exact(2)
            now = time.perf_counter_ns()

            pending += data
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                events.append((now - start, event))

        if close:
            self.close()

        return events


def comparable(events):
    return [(t, e) for t, e in events if b'"choices":[]' not in e]


def median(values):
    return statistics.median(values) if values else float("nan")


def run(plain, metered, streams, keys, timeout=10.0, seed=1):
    rnd = random.Random(seed)
    conns = {
        "plain": Conn(plain[0], plain[1], timeout),
        "metered": Conn(metered[0], metered[1], timeout),
    }
    offsets = {"plain": [], "metered": []}
    gaps = {"plain": [], "metered": []}
    errors = 0

    for i in range(streams):
        order = ["plain", "metered"] if i % 2 == 0 else ["metered", "plain"]
        key = "sk-bench-%08d-xxxxxxxxxxxx" % rnd.randint(1, keys)

        for name in order:
            try:
                events = comparable(conns[name].stream(key))
            except (OSError, StreamError, ValueError) as e:
                errors += 1
                print("sse_timing: %s: %s" % (name, e), file=sys.stderr)
                conns[name].close()
                continue

            offsets[name].append([t for t, _ in events])
            gaps[name].extend(b - a for (a, _), (b, _)
                              in zip(events, events[1:]))

    for c in conns.values():
        c.close()

    n = min(len(o) for s in offsets.values() for o in s) \
        if offsets["plain"] and offsets["metered"] else 0

    result = {"streams": streams, "errors": errors, "events": n}

    per_event = {}
    for name in offsets:
        per_event[name] = [median([o[i] for o in offsets[name]])
                           for i in range(n)]
        result[name] = {
            "ttfb_ms": per_event[name][0] / 1e6 if n else None,
            "last_event_ms": per_event[name][-1] / 1e6 if n else None,
            "gap_ms": median(gaps[name]) / 1e6,
        }

    if n:
        d0 = per_event["metered"][0] - per_event["plain"][0]
        added = [per_event["metered"][i] - per_event["plain"][i] - d0
                 for i in range(1, n)]
        result["added_ttfb_ms"] = d0 / 1e6
        result["added_per_chunk_ms"] = median(added) / 1e6
        result["added_last_event_ms"] = (per_event["metered"][-1]
                                         - per_event["plain"][-1]) / 1e6

    return result


def hostport(s):
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plain", required=True, type=hostport)
    ap.add_argument("--metered", required=True, type=hostport)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    r = run(args.plain, args.metered, args.streams, args.keys,
            seed=args.seed)

    if args.json:
        print(json.dumps(r, indent=1))
        return 0

    print("streams %d, events compared %d, errors %d"
          % (r["streams"], r["events"], r["errors"]))
    for name in ("plain", "metered"):
        print("%-8s ttfb %.3f ms  last event %.3f ms  gap %.3f ms"
              % (name, r[name]["ttfb_ms"], r[name]["last_event_ms"],
                 r[name]["gap_ms"]))
    print("added by the meter: before the first event %.3f ms, "
          "per chunk %.3f ms" % (r["added_ttfb_ms"], r["added_per_chunk_ms"]))
    return 0 if r["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
