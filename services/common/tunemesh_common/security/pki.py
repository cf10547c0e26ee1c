"""A mesh's certificate authority and its certificates (the `cryptography` package).

`tunemesh up` keeps one CA per state dir (`tls/ca.pem`, `tls/ca-key.pem`, 0600) and
issues each process a certificate from it; tests make throwaway ones the same way. A
certificate names its holder twice:

- its **mesh identity**, a DNS name in the subject alternative names (`scheduler.tunemesh`,
  `checkpoint.tunemesh`, `trainer-0.trainer.tunemesh`; see `tls.identity_name`): what
  peers check when they connect (the name a channel verifies) and what servers authorize;
- its **etcd user**, the subject's common name (`tunemesh-scheduler`, `tunemesh-trainer`,
  ...): etcd's client-certificate auth takes the CN as the user its roles apply to.

Every certificate is good for both ends of a TLS connection (server and client auth),
with the host names and addresses it is reached at as more SANs.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825
_PRIVATE = 0o600


@dataclasses.dataclass(frozen=True)
class Authority:
    """A CA: its certificate and key, PEM."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def create(cls, name: str = "tunemesh mesh CA", days: int = CA_DAYS) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    @classmethod
    def load(cls, cert_file: pathlib.Path, key_file: pathlib.Path) -> Authority:
        return cls(pathlib.Path(cert_file).read_bytes(), pathlib.Path(key_file).read_bytes())

    def issue(self, common_name: str, dns_names: Iterable[str] = (), ip_addresses: Iterable[str] = (),
              days: int = LEAF_DAYS) -> Issued:
        """A certificate for `common_name` with the given DNS and IP SANs, for server and
        client auth, signed by this CA."""
        ca_cert = x509.load_pem_x509_certificate(self.cert_pem)
        ca_key = serialization.load_pem_private_key(self.key_pem, password=None)
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dict.fromkeys(dns_names)]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ip_addresses)]
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), self.cert_pem)

    def write(self, directory: pathlib.Path) -> None:
        """`ca.pem` and `ca-key.pem` (0600) in `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.pem").write_bytes(self.cert_pem)
        _write_private(directory / "ca-key.pem", self.key_pem)


@dataclasses.dataclass(frozen=True)
class Issued:
    """A leaf certificate, its key and the CA that signed it, PEM."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def write(self, directory: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
        """`<name>.pem` and `<name>-key.pem` (0600) in `directory`; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert.write_bytes(self.cert_pem)
        _write_private(key, self.key_pem)
        return cert, key


def common_name(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def dns_names(cert_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        return []


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _PRIVATE)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
