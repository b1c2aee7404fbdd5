#!/usr/bin/env python3
"""A TCP proxy on loopback that delays every request by a fixed time: what an object store
far away looks like (tens of milliseconds before each answer) where `tc netem` is not
available. Client-to-server data is held for DELAY_MS before it is forwarded; answers flow
back at once.

    python3 benches/peers/latency_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS [UPSTREAM_HOST]

UPSTREAM_HOST defaults to 127.0.0.1 (benches/experiments/object_net.sh names a server in a
network namespace).
"""
import asyncio
import sys


async def pipe(reader, writer, delay):
    try:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    listen, upstream, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
    host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(host, upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer, delay), pipe(server_reader, client_writer, 0))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
