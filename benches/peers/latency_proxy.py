#!/usr/bin/env python3
"""A TCP proxy that delays every request by a fixed time: what an object store far away looks
like (tens of milliseconds before each answer) where `tc netem` is not available; optionally
behind a NIC of a given rate, where `tc tbf` is not available either.

    python3 benches/peers/latency_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS [UPSTREAM_HOST [RATE_MBIT [CONN_MB_S]]]

UPSTREAM_HOST defaults to 127.0.0.1 (benches/experiments/object_net.sh names a server in a
network namespace, or one on 127.0.0.1 where it cannot make one). It listens on 127.0.0.1.
Client-to-server data is held for DELAY_MS before it is forwarded; answers flow back at once,
or, with RATE_MBIT (megabits per second, > 0), through one token bucket that every
connection's answers share, so that the total is bounded as a NIC bounds it. The bucket counts
what `tbf` on a 1500-byte-MTU link counts: each 1448 bytes of payload (a TCP segment with
timestamps) cost 1514 bytes of frame, so 1000 Mbit/s carries at most ~0.1196 GB/s of bodies.
It holds at most BURST_BYTES (4 MiB, tbf's burst in object_net.sh) of unused tokens.
With CONN_MB_S (> 0), each connection's answers also pass a bucket of their own at that many
MB/s (10^6 bytes of answer per second, CONN_BURST_BYTES of burst): a store that serves each
connection at a bounded rate, as S3 serves each GET at about 90 MB/s, whatever the NIC.

Two threads per connection: one holds each request for the delay, the other moves the answers
with splice(2) through a pipe, so the body bytes never enter Python and the GIL is released
while they move (a single-threaded asyncio proxy capped the rate at ~0.5 GB/s on two cores).
With a rate, the answers move in pieces of at most PIECE_BYTES: each piece is spliced from the
server into the pipe, its tokens are taken (the thread sleeps off any debt), then it is spliced
on to the client.
"""
import os
import socket
import sys
import threading
import time

PIPE_BYTES = 1 << 20
PIECE_BYTES = 256 << 10
BURST_BYTES = 4 << 20
CONN_BURST_BYTES = 256 << 10
FRAME_BYTES, SEGMENT_BYTES = 1514, 1448


class Bucket:
    """A token bucket shared by threads. take(n) charges n bytes at once and sleeps until the
    bucket is out of debt, so the bytes let through by time t never exceed burst + rate * t
    (plus the last piece); the takers queue in the order their debts were charged."""

    def __init__(self, bytes_per_s, burst):
        self.rate, self.burst = bytes_per_s, burst
        self.tokens, self.at = burst, time.monotonic()
        self.lock = threading.Lock()

    def take(self, n):
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            self.tokens -= n
            wait = -self.tokens / self.rate
        if wait > 0:
            time.sleep(wait)


def requests(client, server, delay):
    """Client to server: each read held for the delay (one request of a keep-alive stream)."""
    try:
        while True:
            data = client.recv(1 << 16)
            if not data:
                break
            if delay:
                time.sleep(delay)
            server.sendall(data)
    except OSError:
        pass
    finally:
        shut(server, socket.SHUT_WR)


def answers(server, client, bucket, conn):
    """Server to client through a pipe with splice(2): no copy into Python. With a bucket
    (the NIC's, shared) or `conn` (this connection's own), pieces of at most PIECE_BYTES, each
    paid for before it goes on to the client."""
    r, w = os.pipe()
    piece = PIECE_BYTES if bucket or conn else PIPE_BYTES
    try:
        try:
            import fcntl

            fcntl.fcntl(w, 1031, PIPE_BYTES)  # F_SETPIPE_SZ
        except OSError:
            pass
        while True:
            n = os.splice(server.fileno(), w, piece)
            if n == 0:
                break
            if bucket:
                bucket.take(n * FRAME_BYTES / SEGMENT_BYTES)
            if conn:
                conn.take(n)
            while n:
                n -= os.splice(r, client.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
        shut(client, socket.SHUT_WR)


def shut(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass


def handle(client, host, upstream, delay, bucket, conn_mb_s):
    try:
        server = socket.create_connection((host, upstream))
    except OSError:
        client.close()
        return
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = threading.Thread(target=requests, args=(client, server, delay), daemon=True)
    up.start()
    conn = Bucket(conn_mb_s * 1e6, CONN_BURST_BYTES) if conn_mb_s > 0 else None
    answers(server, client, bucket, conn)
    up.join()
    client.close()
    server.close()


def main():
    if not 4 <= len(sys.argv) <= 7:
        sys.exit(__doc__.split("\n\n")[1])
    listen, upstream, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
    host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
    rate_mbit = float(sys.argv[5]) if len(sys.argv) > 5 else 0
    conn_mb_s = float(sys.argv[6]) if len(sys.argv) > 6 else 0
    bucket = Bucket(rate_mbit * 1e6 / 8, BURST_BYTES) if rate_mbit > 0 else None
    with socket.create_server(("127.0.0.1", listen), reuse_port=True, backlog=512) as listener:
        print(f"listening on 127.0.0.1:{listen}, upstream {host}:{upstream}, delay {delay * 1000:g} ms"
              + (f", rate {rate_mbit:g} Mbit/s" if bucket else "")
              + (f", {conn_mb_s:g} MB/s per connection" if conn_mb_s > 0 else ""), flush=True)
        while True:
            client, _ = listener.accept()
            threading.Thread(target=handle, args=(client, host, upstream, delay, bucket, conn_mb_s),
                             daemon=True).start()


if __name__ == "__main__":
    main()
