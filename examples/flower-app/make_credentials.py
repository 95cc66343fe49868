"""Development credentials for a loopback Flower deployment (docs/flower.md).

Writes, under OUT (default: ./credentials):

- ``certificates/ca.crt`` + ``ca.key``: a self-signed certificate authority;
- ``certificates/server.pem`` + ``server.key``: the SuperLink's TLS certificate, signed by
  that CA, valid for ``localhost`` and ``127.0.0.1`` (the SuperNodes and ``flwr`` check it
  against ``ca.crt``);
- ``keys/supernode-<i>`` + ``.pub`` for i in 1..N: each SuperNode's EC (NIST P-384) key pair
  in OpenSSH format, for Flower's SuperNode authentication (``flwr supernode register``).

For trying things on one machine only: real deployments get their certificates and keys
from their organisation's PKI. Uses the ``cryptography`` package that Flower depends on.

    python make_credentials.py OUT [--supernodes N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEM = serialization.Encoding.PEM
DAYS = 30


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    """A CA certificate (no issuer given) or a server certificate for the loopback names."""
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=DAYS))
    )
    is_ca = issuer is None
    builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), True)
    if not is_ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_credentials(out: Path, supernodes: int = 2) -> None:
    """Write the CA, the SuperLink's certificate and ``supernodes`` SuperNode key pairs."""
    certs = out / "certificates"
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("flexlora loopback CA", ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate("127.0.0.1", server_key, ca.subject, ca_key)
    _write(certs / "ca.crt", ca.public_bytes(PEM))
    _write(certs / "ca.key", _key_pem(ca_key), private=True)
    _write(certs / "server.pem", server.public_bytes(PEM))
    _write(certs / "server.key", _key_pem(server_key), private=True)
    for i in range(1, supernodes + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(out / "keys" / f"supernode-{i}", private, private=True)
        _write(out / "keys" / f"supernode-{i}.pub", public + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="credentials", type=Path)
    parser.add_argument("--supernodes", type=int, default=2)
    args = parser.parse_args()
    make_credentials(args.out, args.supernodes)
    print(f"wrote {args.out}/certificates and {args.supernodes} SuperNode key pairs")


if __name__ == "__main__":
    main()
