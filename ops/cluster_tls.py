"""The cluster's private certificate authority: TLS for the broker's LAN port from its first byte.

`conclave serve --cluster` opens the broker to other machines. Before it listens, it makes (once) a CA and a
server certificate signed by it, in `<home>/credentials/cluster/`:

    ca.pem          the CA certificate: public; every node keeps a copy and trusts only it
    ca.key   0600   the CA's private key: never leaves this machine
    server.pem      the broker's certificate (its host name, localhost and every address of this machine)
    server.key 0600

The broker speaks TLS before anything else (`handshake_first`), so not even the NATS greeting crosses the LAN
in clear. Clients verify the chain against `ca.pem` but not the host name: a node may reach the broker by an
address that was not this machine's when the certificate was made (DHCP, a Thunderbolt bridge), and only this
cluster's CA, whose key stays here, signs certificates a node accepts. A joining node gets `ca.pem` through the
join token: the token names the CA by the SHA-256 of its certificate (`fingerprint`), and the node accepts
the broker only after the certificate it received hashes to that (ops/join.py), the way kubeadm's
`--discovery-token-ca-cert-hash` works.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ops.credentials import credentials_dir, write_private

VALID_DAYS = 3650  # a private CA: rotating it means every node re-joins, so it is made to outlive the hardware


def tls_dir(home: Path) -> Path:
    folder = credentials_dir(home) / "cluster"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o700)
    return folder


def fingerprint(pem: bytes) -> str:
    """SHA-256 of the certificate's DER form, hex: what a join token carries to name its CA."""
    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)).hexdigest()


def _local_addresses() -> list[str]:
    import psutil

    return sorted({a.address.split("%")[0] for addresses in psutil.net_if_addrs().values() for a in addresses
                   if a.family in (socket.AF_INET, socket.AF_INET6)})


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: x509.Name, public_key, issuer: x509.Name, signing_key, ca: bool, names: list[str]):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        alternatives = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        builder = (builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
                   # Client too: a broker dials the others' route ports with it (mutual TLS, nats_server.py).
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return builder.sign(signing_key, hashes.SHA256())


def _ca(home: Path):
    folder = tls_dir(home)
    return (serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None),
            x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes()))


def _server_certificate(home: Path, public_key, host: str, names: list[str]) -> bytes:
    ca_key, ca_cert = _ca(home)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    return _certificate(subject, public_key, ca_cert.subject, ca_key, False, names).public_bytes(
        serialization.Encoding.PEM)


def ensure_cluster_tls(home: Path) -> Path:
    """Make the CA (once) and a server certificate for this machine's current names; returns the folder."""
    folder = tls_dir(home)
    if not (folder / "ca.key").exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Conclave cluster CA ({socket.gethostname()})")])
        write_private(folder / "ca.key", _key_pem(ca_key))
        (folder / "ca.pem").write_bytes(_certificate(name, ca_key.public_key(), name, ca_key, True, [])
                                        .public_bytes(serialization.Encoding.PEM))
    # Re-issued at every start: the machine's addresses may have changed since the last one.
    server_key = ec.generate_private_key(ec.SECP256R1())
    certificate = _server_certificate(home, server_key.public_key(), socket.gethostname(), machine_names())
    write_private(folder / "server.key", _key_pem(server_key))
    (folder / "server.pem").write_bytes(certificate)
    return folder


def machine_names() -> list[str]:
    """What a certificate for this machine names: its host name, localhost and every address it has now."""
    return [socket.gethostname(), "localhost", *_local_addresses()]


def new_broker_key(home: Path) -> str:
    """A joining broker's side (ops/brokers.py): a new key for its server certificate, kept in its home; returns
    the public half (PEM) for the first machine to certify. The private half never leaves the machine."""
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(tls_dir(home) / "server.key", _key_pem(key))
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def certify_broker(home: Path, public_key_pem: str, host: str, names: list[str]) -> str:
    """The first machine's side: a server certificate, signed by the cluster CA, for a joining broker's key
    (it serves clients with it and dials the other brokers' routes with it). `names` were checked when the
    request was decoded (schemas/membership.py: host names and addresses only)."""
    try:
        public_key = serialization.load_pem_public_key(public_key_pem.encode())
    except UnsupportedAlgorithm as exc:  # a curve or algorithm cryptography does not know
        raise ValueError(str(exc)) from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError("a broker's key must be an elliptic-curve key")
    return _server_certificate(home, public_key, host, names).decode()


def self_signed(folder: Path, stem: str, names: list[str]) -> tuple[Path, Path, str]:
    """A fresh key and a certificate it signs itself, as `<stem>.key` (0600) and `<stem>.pem` in `folder`; returns
    their paths and the certificate (PEM). For a port whose clients learn its certificate over an authenticated
    channel and trust only it (ops/model_files.py: a node's tickets carry its file port's): no CA is involved, so
    every node makes its own at every start."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Conclave {stem} ({socket.gethostname()})")])
    certificate = _certificate(name, key.public_key(), name, key, False, names).public_bytes(serialization.Encoding.PEM)
    write_private(folder / f"{stem}.key", _key_pem(key))
    (folder / f"{stem}.pem").write_bytes(certificate)
    return folder / f"{stem}.pem", folder / f"{stem}.key", certificate.decode()
