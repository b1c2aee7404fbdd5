#!/usr/bin/env python3
"""A TCP proxy that delays every request by a fixed time: what an object store far away looks
like (tens of milliseconds before each answer) where `tc netem` is not available. Client-to-server
data is held for DELAY_MS before it is forwarded; answers flow back at once.

    python3 benches/peers/latency_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS [UPSTREAM_HOST]

UPSTREAM_HOST defaults to 127.0.0.1 (benches/experiments/object_net.sh names a server in a
network namespace). It listens on 127.0.0.1.

Two threads per connection: one holds each request for the delay, the other moves the answers
with splice(2) through a pipe, so the body bytes never enter Python and the GIL is released
while they move (a single-threaded asyncio proxy capped the rate at ~0.5 GB/s on two cores).
"""
import os
import socket
import sys
import threading
import time

PIPE_BYTES = 1 << 20


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


def answers(server, client):
    """Server to client through a pipe with splice(2): no copy into Python."""
    r, w = os.pipe()
    try:
        try:
            import fcntl

            fcntl.fcntl(w, 1031, PIPE_BYTES)  # F_SETPIPE_SZ
        except OSError:
            pass
        while True:
            n = os.splice(server.fileno(), w, PIPE_BYTES)
            if n == 0:
                break
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


def handle(client, host, upstream, delay):
    try:
        server = socket.create_connection((host, upstream))
    except OSError:
        client.close()
        return
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = threading.Thread(target=requests, args=(client, server, delay), daemon=True)
    up.start()
    answers(server, client)
    up.join()
    client.close()
    server.close()


def main():
    listen, upstream, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
    host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
    with socket.create_server(("127.0.0.1", listen), reuse_port=True, backlog=512) as listener:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=handle, args=(client, host, upstream, delay), daemon=True).start()


if __name__ == "__main__":
    main()
