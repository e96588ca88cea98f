"""The listening sockets: bound by the master before any fork, shared by every receiver.

A listener is known by its address *as configured* (``127.0.0.1:0`` stays the same listener
across reloads even though the kernel chose its port), so a reload keeps each socket whose
address is still configured open throughout: its accept queue is never closed, and no client
is refused while one generation of receivers replaces another.

This module never forks and never decides when sockets are closed (the arbiter does).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from empath.config import Address

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


class ListenError(OSError):
    """A listener cannot be bound; ``str()`` names the address and the reason."""


@dataclass
class Listener:
    configured: Address  # as written in the configuration (port 0: any free port)
    sock: socket.socket
    bound: Address  # what the kernel gave us

    def close(self) -> None:
        self.sock.close()


def bind_listener(address: Address) -> Listener:
    """A non-blocking listening socket on ``address`` (IPv4 or IPv6 as the host says)."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    try:
        # Restart without waiting for TIME_WAIT connections of the previous run to expire.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::]:25 must not also claim 0.0.0.0:25, which may be a listener of its own.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return Listener(address, sock, Address(address.host, sock.getsockname()[1]))


def bind_all(addresses: list[Address], keep: list[Listener]) -> list[Listener]:
    """Listeners for ``addresses`` in order: those in ``keep`` reused, the others bound.

    All or nothing: on a failure the newly bound ones are closed again and ListenError raised.
    """
    by_address = {lst.configured: lst for lst in keep}
    out: list[Listener] = []
    try:
        for address in addresses:
            out.append(by_address.get(address) or bind_listener(address))
    except ListenError:
        for lst in out:
            if lst not in keep:
                lst.close()
        raise
    return out
