"""How the agent's network outputs (the gRPC flow API, Prometheus /metrics) listen on TCP: one policy for all.

An address is HOST:PORT with an IP address. TLS needs a certificate and a key; without them an output serves
plaintext on loopback only, unless the user forces plaintext anywhere with a flag that says what it costs.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from flowscope.pipeline.sink import SinkError
from flowscope.pipeline.status import StatusError

log = logging.getLogger(__name__)


class ListenError(StatusError, SinkError):
    """An output cannot listen as configured; the message is one sentence that says what to do (a StatusError:
    the agent reports it as it reports its status API's; a SinkError: the pipeline passes it on as it is)."""


@dataclass(frozen=True)
class ListenFlags:
    """The flags of one output, named in its messages."""

    address: str  # --grpc-addr
    cert: str  # --tls-cert
    key: str  # --tls-key
    plaintext_anywhere: str  # --grpc-plaintext-anywhere
    what: str  # "the flow API": what anyone who reaches a plaintext address reads
    reads: str  # "every flow"


def read_pem(path: str, flag: str, marker: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ListenError(f"cannot read {flag} {path} ({err.strerror}); give a readable PEM file.") from None
    if f"-----BEGIN {marker}".encode() not in data and marker not in data.decode(errors="replace"):
        raise ListenError(f"{flag} {path} is not a PEM {marker.lower()}; give a PEM file.")
    return data


def parse_address(address: str, flag: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT with an IP address ([::1]:4244 for IPv6)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise ListenError(f"{flag} {address!r} is not HOST:PORT with an IP address (e.g. 127.0.0.1:4244).") from None
    return host, number


def uses_tls(
    address: str, cert: str | None, key: str | None, plaintext_anywhere: bool, flags: ListenFlags
) -> tuple[str, int, bool]:
    """(host, port, whether to serve TLS) for `address`, or a ListenError when the policy forbids it: TLS with
    both a certificate and a key (each a readable PEM file); plaintext on loopback, or anywhere when forced."""
    host, port = parse_address(address, flags.address)
    if cert or key:
        if not (cert and key):
            raise ListenError(f"TLS needs both {flags.cert} and {flags.key}.")
        read_pem(key, flags.key, "PRIVATE KEY")
        read_pem(cert, flags.cert, "CERTIFICATE")
        return host, port, True
    loopback = ipaddress.ip_address(host).is_loopback
    if not loopback and not plaintext_anywhere:
        raise ListenError(
            f"{flags.address} {address} is not loopback: give {flags.cert} and {flags.key} (or force plaintext "
            f"with {flags.plaintext_anywhere})."
        )
    if not loopback:
        log.warning("%s serves plaintext on %s: anyone who can reach it reads %s", flags.what, address, flags.reads)
    return host, port, False
