"""Throw-away certificates for TLS tests: a self-signed CA, and leaf certificates it signs."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key."""

    certificate: bytes
    private_key: bytes


@dataclasses.dataclass(frozen=True)
class Certificates:
    """A CA plus a server certificate (127.0.0.1, localhost) and a client certificate."""

    ca: KeyPair
    server: KeyPair
    client: KeyPair


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: str, issuer: str, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName],
) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(common_name, "visionrpc test CA", key.public_key())
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def make_certificates() -> Certificates:
    """Generate a fresh CA, a server certificate for 127.0.0.1/localhost, and a client one."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_certificate = (
        _builder("visionrpc test CA", "visionrpc test CA", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = _leaf(
        ca_key,
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _leaf(ca_key, "visionrpc test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    ca = KeyPair(ca_certificate.public_bytes(serialization.Encoding.PEM), _pem_key(ca_key))
    return Certificates(ca=ca, server=server, client=client)
