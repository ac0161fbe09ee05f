"""A self-signed certificate for the app API when the operator configured none.

TLS is on by default (DESIGN.md: port 24998, TLS); a fresh install must still come up, so we make
an EC P-256 key and a certificate with a SAN for every configured host name or IP address. The
operator pins it by its SHA-256 fingerprint, which the core logs and the console shows.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALIDITY_DAYS = 825  # the longest lifetime Apple platforms accept for TLS server certificates
KEY_MODE = 0o600


def ensure_self_signed(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str],
                       hostnames: list[str]) -> None:
    """Create key and certificate unless both files exist already (an existing pair is kept)."""
    cert_file, key_file = Path(cert_path), Path(key_path)
    if cert_file.exists() and key_file.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(key, _usable_names(hostnames))
    _write_private(key_file, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cert_file.with_name(cert_file.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(cert_file)


def certificate_fingerprint(cert_path: str | os.PathLike[str]) -> str:
    """SHA-256 fingerprint as colon-separated upper-case hex (the form browsers and openssl show)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _self_signed(key: ec.EllipticCurvePrivateKey, hostnames: list[str]) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0][:64]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SIPIS self-signed")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hostnames]), critical=False)
        # CA:TRUE so clients can pin this very certificate as their trust anchor.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _usable_names(hostnames: list[str]) -> list[str]:
    """Deduplicated names; wildcard listen addresses (0.0.0.0, ::) mean nothing to a client."""
    names: list[str] = []
    for host in hostnames:
        host = host.strip().strip("[]")
        if not host or host in names:
            continue
        try:
            if ipaddress.ip_address(host).is_unspecified:
                continue
        except ValueError:
            pass
        names.append(host)
    return names or ["localhost"]


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """Write with mode 0600 from the start (no window where the key is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(tmp, KEY_MODE)  # the umask may have removed bits, never added: make it exact
    tmp.replace(path)
