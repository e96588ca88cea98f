"""A small authoritative DNS server on loopback for tests (UDP and TCP, one port).

The zone is Python data; names are written without the trailing dot::

    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "ttl": 60},       # ttl for every type here
        "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": (5, ["::1"])},  # (ttl, records)
        "nullmx.test": {"MX": [(0, ".")]},                           # RFC 7505 null MX
        "alias.example.test": {"CNAME": ["example.test"]},
        "note.example.test": {"TXT": ["v=spf1 -all"]},
    }
    with DNSServer(zone) as dns_server:         # 127.0.0.1, a free port, in a thread
        dns_server.port                         # -> delivery.dns.resolver 127.0.0.1:<port>
        dns_server.servfail.add("broken.test")  # answer SERVFAIL for this name
        dns_server.silent.add("slow.test")      # never answer this name
        dns_server.servfail.add("mx2.example.test/AAAA")  # only this type of the name
        dns_server.count("example.test", "MX")  # queries seen (also count(name) for any type)
        dns_server.set("mx1.example.test", "A", ["127.0.0.9"], ttl=1)  # change the zone live

Names at or under an apex in ``origins`` (default: the last label of every zone name, so
"test" above) are authoritative: an unknown one is NXDOMAIN, a known one without the asked type
is an empty NOERROR (NODATA); both carry an SOA whose MINIMUM is ``negative_ttl``. Other
names are REFUSED. A UDP answer too big for the client's buffer is sent truncated (TC) and
the client retries over TCP.

Run alone: ``python -m tests.support.dnsserver --zone zone.json`` prints the port and serves
until killed (zone.json: the mapping above, lists for tuples).
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import struct
import sys
import threading
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

DEFAULT_TTL = 300


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class DNSServer:
    """An authoritative server for ``zone`` on ``host`` (UDP and TCP on the same port)."""

    def __init__(self, zone: dict[str, dict[str, Any]], *, host: str = "127.0.0.1",
                 port: int = 0, origins: tuple[str, ...] | None = None,
                 negative_ttl: int = 30) -> None:
        self.host = host
        self.requested_port = port
        self._zone: dict[str, dict[str, tuple[int, list[str]]]] = {}
        for name, types in zone.items():
            for rdtype, value in types.items():
                if rdtype == "ttl":
                    continue
                ttl, records = value if isinstance(value, tuple) else (
                    types.get("ttl", DEFAULT_TTL), value)
                self.set(name, rdtype, records, ttl=ttl)
        self.origins = tuple(_key(o) for o in origins) if origins else tuple(
            {_key(name).rsplit(".", 1)[-1] for name in zone})
        self.negative_ttl = negative_ttl
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.port = 0

    # -- the zone -------------------------------------------------------------------------
    def set(self, name: str, rdtype: str, records: list[Any], ttl: int = DEFAULT_TTL) -> None:
        """Replace the ``rdtype`` records of ``name`` (an empty list removes them)."""
        texts = [self._rdata_text(rdtype.upper(), r) for r in records]
        entry = self._zone.setdefault(_key(name), {})
        if texts:
            entry[rdtype.upper()] = (int(ttl), texts)
        else:
            entry.pop(rdtype.upper(), None)

    def remove(self, name: str) -> None:
        self._zone.pop(_key(name), None)

    @staticmethod
    def _rdata_text(rdtype: str, record: Any) -> str:
        if rdtype == "MX":
            preference, exchange = record
            return f"{int(preference)} {_absolute(exchange) if exchange != '.' else '.'}"
        if rdtype in ("CNAME", "NS", "PTR"):
            return _absolute(str(record))
        if rdtype == "TXT":
            # One character-string holds at most 255 octets: longer values (DKIM keys) are
            # split into several strings of one record, as zone files write them.
            text = str(record)
            parts = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
            return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"'
                            for p in parts)
        return str(record)

    def count(self, name: str, rdtype: str | None = None) -> int:
        """Queries received for ``name`` (of ``rdtype``, or of any type)."""
        with self._lock:
            if rdtype is not None:
                return self.queries[(_key(name), rdtype.upper())]
            return sum(n for (q, _), n in self.queries.items() if q == _key(name))

    def reset_counts(self) -> None:
        with self._lock:
            self.queries.clear()

    # -- answering ------------------------------------------------------------------------
    def _in_zone(self, name: str) -> bool:
        return any(name == o or name.endswith("." + o) for o in self.origins)

    def _soa(self, name: str) -> dns.rrset.RRset:
        origin = next((o for o in self.origins if name == o or name.endswith("." + o)), name)
        return dns.rrset.from_text(
            _absolute(origin), self.negative_ttl, "IN", "SOA",
            f"ns.{_absolute(origin)} hostmaster.{_absolute(origin)} 1 3600 600 86400 "
            f"{self.negative_ttl}")

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query message, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        question = query.question[0]
        qname = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries[(qname, rdtype)] += 1
        if qname in self.silent or f"{qname}/{rdtype}" in self.silent:
            return None
        if qname in self.servfail or f"{qname}/{rdtype}" in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if not self._in_zone(qname):
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        name = qname
        for _ in range(8):  # follow CNAMEs inside the zone, a few links at most
            entry = self._zone.get(name)
            if entry is None:
                if name == qname:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa(name))
                break
            if rdtype != "CNAME" and "CNAME" in entry:
                ttl, texts = entry["CNAME"]
                response.answer.append(dns.rrset.from_text_list(
                    _absolute(name), ttl, "IN", "CNAME", texts))
                name = _key(texts[0])
                continue
            if rdtype in entry:
                ttl, texts = entry[rdtype]
                response.answer.append(dns.rrset.from_text_list(
                    _absolute(name), ttl, "IN", rdtype, texts))
            else:
                response.authority.append(self._soa(name))
            break
        return response.to_wire()

    def _answer_udp(self, wire: bytes) -> bytes | None:
        out = self.answer(wire)
        if out is None:
            return None
        try:
            limit = max(512, dns.message.from_wire(wire).payload)
        except dns.exception.DNSException:
            limit = 512
        if len(out) <= limit:
            return out
        truncated = dns.message.make_response(dns.message.from_wire(wire))
        truncated.flags |= dns.flags.TC
        return truncated.to_wire()

    # -- sockets --------------------------------------------------------------------------
    def _bind(self) -> None:
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, self.requested_port))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if self.requested_port:
                    raise
                continue
            tcp.listen(16)
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise OSError("no port free for both UDP and TCP")

    def _serve_udp(self) -> None:
        assert self._udp is not None
        self._udp.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            out = self._answer_udp(wire)
            if out is not None:
                try:
                    self._udp.sendto(out, peer)
                except OSError:
                    pass

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        self._tcp.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_client, args=(conn,), daemon=True).start()

    def _tcp_client(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            try:
                while not self._stopping.is_set():
                    head = self._recv_exact(conn, 2)
                    if head is None:
                        return
                    wire = self._recv_exact(conn, struct.unpack("!H", head)[0])
                    if wire is None:
                        return
                    out = self.answer(wire)
                    if out is not None:
                        conn.sendall(struct.pack("!H", len(out)) + out)
            except OSError:
                return

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def start(self) -> DNSServer:
        self._bind()
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, name="test-dns", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _zone_from_json(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    zone: dict[str, dict[str, Any]] = {}
    for name, types in data.items():
        zone[name] = {}
        for rdtype, value in types.items():
            if rdtype == "MX":
                value = [tuple(v) for v in value]
            zone[name][rdtype] = value
    return zone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zone", required=True, help="JSON file with the zone data")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.zone) as f:
        zone = _zone_from_json(json.load(f))
    server = DNSServer(zone, host=args.host, port=args.port).start()
    print(server.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
