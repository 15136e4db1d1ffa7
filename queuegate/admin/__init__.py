"""The admin socket: a local control and observation channel for `queuegate admin` and `queuegate top`.

`protocol.py` is the wire format (its statistics come from `queuegate.statistics`); `client.py` the trio client
(`queuegate admin`), `aio_client.py` the asyncio one (`queuegate top`, on Textual); `server.py` the daemon's side;
`command.py` the `queuegate admin` command line. This package imports none of them, so a client loads only what it
uses.
"""
