"""Throw-away certificate authorities and certificates for TLS tests, made at test time.

::

    ca = TestCa.create(tmp_path, "test CA")
    server = ca.issue(tmp_path, "phone", ip="127.0.0.1")     # cert + key PEM files
    wrong = ca.issue(tmp_path, "wrong", dns="pbx.example.org")  # valid, wrong name

RSA 2048 and SHA-256 throughout: the pjsua2 wheel's OpenSSL 1.0.2k takes them
with any cipher suite it offers.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TestCa:
    """A self-signed CA (``cert`` is the file a verifier is given) that issues leaf certs."""

    __test__ = False  # not a pytest test class

    cert: Path
    _cert: x509.Certificate
    _key: rsa.RSAPrivateKey

    @classmethod
    def create(cls, directory: Path, name: str) -> TestCa:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        path = _fresh(directory, _slug(name), "ca.pem")
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(path, cert, key)

    def issue(self, directory: Path, name: str, *, ip: str = "", dns: str = "") -> Issued:
        """A server and client certificate for ``ip`` and/or ``dns`` (CN: ``name``)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        names: list[x509.GeneralName] = []
        if ip:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        if dns:
            names.append(x509.DNSName(dns))
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = _fresh(directory, _slug(name), "cert.pem")
        key_path = cert_path.with_name("key.pem")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        return Issued(cert_path, key_path)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()) or "cert"


def _fresh(directory: Path, stem: str, filename: str) -> Path:
    """``directory/stem[-N]/filename`` in a directory of its own, made here."""
    for i in range(1000):
        folder = directory / (stem if i == 0 else f"{stem}-{i}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        return folder / filename
    raise RuntimeError(f"cannot make a certificate directory under {directory}")
