"""The API over TCP: TLS and mutual TLS with certificates the test makes, a wrong client certificate refused,
plaintext refused on a non-loopback address without the force flag, bad paths and addresses in one sentence."""

from __future__ import annotations

import datetime
import ipaddress
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flowscope.config import ClientConfig
from flowscope.proto.client import ClientError
from tests.integration.grpc_agents import Agent, free_port, interval_batches, recording, run_flowscope
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def issue(directory: Path, name: str, issuer: tuple | None = None, server: bool = False) -> tuple:
    """A key and certificate (a CA when `issuer` is None) written as name.pem / name-key.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_key, signer_name = (key, _name(name)) if issuer is None else (issuer[0], issuer[1].subject)
    builder = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(signer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )  # fmt: skip
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return key, cert


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    ca = issue(directory, "ca")
    issue(directory, "server", ca, server=True)
    issue(directory, "client", ca)
    issue(directory, "stranger", issue(directory, "other-ca"))  # signed by a CA the server does not trust
    return directory


def test_tls_and_mutual_tls_with_a_wrong_client_certificate_refused(tmp_path, certificates):
    port = free_port()
    pki = {name: str(certificates / f"{name}.pem") for name in ("ca", "server", "client", "stranger")}
    keys = {name: str(certificates / f"{name}-key.pem") for name in ("server", "client", "stranger")}
    server = [
        "--grpc-addr", f"127.0.0.1:{port}", "--tls-cert", pki["server"], "--tls-key", keys["server"],
        "--tls-client-ca", pki["ca"],
    ]  # fmt: skip
    trusted = ClientConfig(
        server=f"127.0.0.1:{port}", tls_ca=pki["ca"], tls_client_cert=pki["client"], tls_client_key=keys["client"],
        timeout=5.0,
    )  # fmt: skip
    with Agent.start(tmp_path, None, *server, client=trusted) as agent:
        assert agent.client().status().node == "agent"
        for refused in (
            {"tls_client_cert": pki["stranger"], "tls_client_key": keys["stranger"]},  # a certificate of another CA
            {"tls_client_cert": None, "tls_client_key": None},  # no client certificate
            {"tls": False, "tls_ca": None, "tls_client_cert": None, "tls_client_key": None},  # plaintext
        ):
            with pytest.raises(ClientError, match=f"no flowscope server answers on 127.0.0.1:{port}"):
                agent.client(**refused).status()
        cli = run_flowscope(
            "status", "--server", f"127.0.0.1:{port}", "--tls-ca", pki["ca"], "--tls-client-cert", pki["client"],
            "--tls-client-key", keys["client"],
        )  # fmt: skip
        assert cli.returncode == 0 and cli.stdout.startswith(f"health        SERVING (via 127.0.0.1:{port})"), (
            cli.stderr
        )


def test_plaintext_off_loopback_needs_the_force_flag_and_bad_settings_are_one_sentence(tmp_path, certificates):
    port = free_port()
    base = ["agent", "--grpc-socket", str(tmp_path / "a.sock"), "--hubble-socket", str(tmp_path / "h.sock"),
            "--status-socket", str(tmp_path / "s.sock"), "--replay", "/dev/null", "--exit-at-end"]  # fmt: skip
    cases = [
        (["--grpc-addr", f"0.0.0.0:{port}"],
         f"--grpc-addr 0.0.0.0:{port} is not loopback: give --tls-cert and --tls-key (or force plaintext with "
         "--grpc-plaintext-anywhere)."),
        (["--grpc-addr", "localhost:80x"], "--grpc-addr 'localhost:80x' is not HOST:PORT with an IP address (e.g. 127.0.0.1:4244)."),  # noqa: E501
        (["--grpc-addr", f"127.0.0.1:{port}", "--tls-cert", str(tmp_path / "absent.pem"), "--tls-key", str(certificates / "server-key.pem")],  # noqa: E501
         f"cannot read --tls-cert {tmp_path / 'absent.pem'} (No such file or directory); give a readable PEM file."),
        (["--grpc-addr", f"127.0.0.1:{port}", "--tls-cert", str(certificates / "server-key.pem"), "--tls-key", str(certificates / "server-key.pem")],  # noqa: E501
         f"--tls-cert {certificates / 'server-key.pem'} is not a PEM certificate; give a PEM file."),
    ]  # fmt: skip
    for extra, message in cases:
        result = run_flowscope(*base, *extra)
        assert (result.returncode, result.stderr.splitlines()[-1]) == (1, f"flowscope agent: {message}")
    forced = run_flowscope(*base, "--grpc-addr", f"0.0.0.0:{port}", "--grpc-plaintext-anywhere")
    assert forced.returncode == 0, forced.stderr
    assert f"the flow API serves plaintext on 0.0.0.0:{port}: anyone who can reach it reads every flow" in forced.stderr


def test_a_relay_reaching_its_agents_over_mutual_tls_lists_them_with_their_tls(tmp_path, certificates):
    """hubble list nodes / hubble status on a relay whose agents are TLS servers: one agent answers, the other
    address has none yet (unavailable, no version known); both are listed as reached with TLS and the server
    name the relay checks."""
    port, nobody = free_port(), free_port()
    pki = {name: str(certificates / f"{name}.pem") for name in ("ca", "server", "client")}
    keys = {name: str(certificates / f"{name}-key.pem") for name in ("server", "client")}
    trusted = ClientConfig(
        server=f"127.0.0.1:{port}", tls_ca=pki["ca"], tls_client_cert=pki["client"], tls_client_key=keys["client"],
        tls_server_name="localhost", timeout=5.0,
    )  # fmt: skip
    batches = interval_batches(pd.Timestamp("2025-03-01T12:00:00Z"), 2, 0.1, 2, "agent")
    agent = Agent.start(
        tmp_path, recording(tmp_path / "agent.jsonl", batches), "--speed", "0", "--grpc-addr", f"127.0.0.1:{port}",
        "--tls-cert", pki["server"], "--tls-key", keys["server"], "--tls-client-ca", pki["ca"], client=trusted,
    )  # fmt: skip
    relay = None
    try:
        relay = Agent.start(
            tmp_path, None, "--peer", f"127.0.0.1:{port}", "--peer", f"127.0.0.1:{nobody}", "--tls-ca", pki["ca"],
            "--tls-client-cert", pki["client"], "--tls-client-key", keys["client"], "--tls-server-name", "localhost",
            "--relay-interval", "0.1", "--backoff", "0.1", name="relay", command="relay",
        )  # fmt: skip
        wait_for(lambda: relay.hubble_node_counts()[0] == 1, 60, "the relay connected to the TLS agent")
        counts, nodes = relay.hubble_node_counts(), relay.hubble_nodes()
    finally:
        if relay is not None:
            relay.stop()
        agent.stop()
    assert counts == (1, 1, [f"127.0.0.1:{nobody}"])
    assert nodes == [
        ("agent", "NODE_CONNECTED", f"flowscope {version('flowscope')}", f"127.0.0.1:{port}", True, "localhost"),
        (f"127.0.0.1:{nobody}", "NODE_UNAVAILABLE", "", f"127.0.0.1:{nobody}", True, "localhost"),
    ]
