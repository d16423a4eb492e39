"""Certificates and keys for a Flower deployment with TLS and SuperNode authentication.

What ``docs/flower.md`` does with ``openssl`` and ``ssh-keygen``, in Python (``cryptography``, which
Flower depends on), for tests, benchmarks and a quick start:

* :func:`make_certificates` -- a self-made CA and a server certificate for the SuperLink, whose subject
  alternative names are the addresses clients use to reach it (``--ssl-ca-certfile``,
  ``--ssl-certfile``, ``--ssl-keyfile`` of ``flower-superlink``; ``--root-certificates`` of the
  SuperNodes and ``root-certificates`` in ``config.toml``);
* :func:`make_node_key` -- a SuperNode's EC key pair on NIST P-384 in OpenSSH format: the private key for
  ``--auth-supernode-private-key``, the public key for ``flwr supernode register``.

A real deployment should use its organisation's CA; these certificates are valid for ``days`` days.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA certificate, the SuperLink's certificate and its private key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str):  # noqa: ANN202
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]):  # noqa: ANN202
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(folder: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), *,
                      days: int = 30) -> TLSFiles:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` to ``folder``: a CA (EC P-384) and a server
    certificate it signed for ``hosts`` (IP addresses or DNS names, all in the subject alternative name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not hosts:
        raise ValueError("make_certificates needs at least one host")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fedtalora-ca")).issuer_name(_name("fedtalora-ca"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TLSFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    files.server_key.chmod(0o600)
    return files


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """Write a SuperNode's key pair (EC P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``):
    ``path`` (private, mode 600) and ``path.pub``; returns both paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(path)
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public = private.with_name(private.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public
