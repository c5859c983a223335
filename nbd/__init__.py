"""The NBD protocol: wire formats, sans-I/O cores, asyncio server and client."""
