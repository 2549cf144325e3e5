"""``mfd tls-certs DIR``: a throwaway CA and the certificates QEMU's ``tls-creds-x509`` reads.

For demos and tests, not for production (a real deployment has its own CA). Made with
`cryptography` rather than hand-written ASN.1; the extensions are the ones QEMU's sanity
checks (``crypto/tlscredsx509.c``) want: the CA is a CA that may sign certificates, the
server certificate is for ``serverAuth``, the client's for ``clientAuth``, both with the
key usages digitalSignature and keyEncipherment, and the server's carries every ``--host``
as a DNS name or an IP address (what GnuTLS and OpenSSL compare the host name with).
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from mfd.workers.tls import CA, CLIENT, SERVER, distinguished_name

DAY = datetime.timedelta(days=1)
CA_KEY = "ca-key.pem"  # not QEMU's: only this tool reads it


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())  # fast to make, GnuTLS and OpenSSL take it


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mfd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: str, data: bytes, secret: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make(directory: str, hosts: list[str], client_cn: str = "mfd-client", days: int = 365,
         start: datetime.datetime | None = None) -> dict[str, str]:
    """Write ca-cert.pem (and ca-key.pem), server-cert.pem, server-key.pem,
    client-cert.pem, client-key.pem into ``directory``, valid from ``start`` (default: a
    minute ago) for ``days``. A CA already there (with its key) signs the new
    certificates: the two hosts of a migration can share it. Returns the subjects, as
    --tls-authz takes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    os.makedirs(directory, exist_ok=True)
    start = start or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    end = start + days * DAY

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def usage(sign: bool):
        return x509.KeyUsage(digital_signature=not sign, key_encipherment=not sign,
                             content_commitment=False, data_encipherment=False,
                             key_agreement=False, key_cert_sign=sign, crl_sign=sign,
                             encipher_only=False, decipher_only=False)

    ca_path, ca_key_path = os.path.join(directory, CA), os.path.join(directory, CA_KEY)
    if os.path.exists(ca_path) and os.path.exists(ca_key_path):  # one CA for every host
        with open(ca_path, "rb") as f:
            ca_name = x509.load_pem_x509_certificate(f.read()).subject
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
    else:
        ca_key = _key()
        ca_name = _name(f"mfd test CA {os.urandom(4).hex()}")  # each CA its own issuer name
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(usage(True), critical=True)
              .sign(ca_key, hashes.SHA256()))
        _write(ca_path, ca.public_bytes(serialization.Encoding.PEM))
        _write(ca_key_path, pem_key(ca_key), secret=True)
    subjects = {}
    for (cert_file, key_file), cn, purpose, sans in (
            (SERVER, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, hosts),
            (CLIENT, client_cn, ExtendedKeyUsageOID.CLIENT_AUTH, [])):
        key = _key()
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(usage(False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False))
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(os.path.join(directory, cert_file), cert.public_bytes(serialization.Encoding.PEM))
        _write(os.path.join(directory, key_file), pem_key(key), secret=True)
        subjects[cert_file] = distinguished_name(cert.subject)
    return subjects
