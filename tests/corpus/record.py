"""Records TCP sessions through a relay: LISTEN_PORT -> SERVER_PORT,
writing what each side of the Nth session sent to PREFIX.N.client and
PREFIX.N.server."""
import asyncio, sys

listen, target, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

async def pump(reader, writer, out):
    while True:
        data = await reader.read(65536)
        if not data:
            break
        out.write(data)
        writer.write(data)
        await writer.drain()
    writer.close()

count = 0
async def session(cr, cw):
    global count
    count += 1
    n = count
    sr, sw = await asyncio.open_connection("127.0.0.1", target)
    with open(f"{prefix}.{n}.client", "wb") as c, open(f"{prefix}.{n}.server", "wb") as s:
        await asyncio.gather(pump(cr, sw, c), pump(sr, cw, s), return_exceptions=True)

async def main():
    server = await asyncio.start_server(session, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()

asyncio.run(main())
