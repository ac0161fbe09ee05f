"""ApiServer over real HTTPS on loopback, plus the self-signed certificate helper."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sipis.api import create_app
from sipis.api.server import SELF_SIGNED_CERT, SELF_SIGNED_KEY, ApiServer
from sipis.tls_certs import VALIDITY_DAYS, certificate_fingerprint, ensure_self_signed
from tests.api.test_app_api import FakeService


def test_self_signed_certificate(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    ensure_self_signed(cert_path, key_path, ["sipis.example.net", "127.0.0.1", "[::1]", "0.0.0.0", "::1"])
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sipis.example.net"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("::1")}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime.days - VALIDITY_DAYS) <= 1
    fingerprint = certificate_fingerprint(cert_path)
    assert len(fingerprint.split(":")) == 32

    ensure_self_signed(cert_path, key_path, ["other"])  # both present: kept as they are
    assert certificate_fingerprint(cert_path) == fingerprint
    key_path.unlink()
    ensure_self_signed(cert_path, key_path, ["other"])  # one missing: a fresh pair
    assert certificate_fingerprint(cert_path) != fingerprint
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


async def test_https_health_on_ephemeral_port(tmp_path: Path) -> None:
    sigterm_before = signal.getsignal(signal.SIGTERM)
    server = ApiServer(create_app(FakeService()), host="127.0.0.1", port=0, state_dir=tmp_path,
                       hostnames=["localhost", "127.0.0.1"])
    await server.start()
    try:
        assert server.port != 0
        assert signal.getsignal(signal.SIGTERM) is sigterm_before  # uvicorn left signals alone
        cert = tmp_path / SELF_SIGNED_CERT
        assert stat.S_IMODE((tmp_path / SELF_SIGNED_KEY).stat().st_mode) == 0o600
        assert server.fingerprint == certificate_fingerprint(cert)
        context = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=context, base_url=server.url) as client:
            response = await client.get("/v1/health")
            assert response.status_code == 200
            assert response.json() == {"status": "ok"}
            assert "server" not in response.headers
            response = await client.post("/v1/instances", json={})
            assert response.status_code == 401
        async with httpx.AsyncClient(base_url=server.url) as untrusting:  # system CAs only
            with pytest.raises(httpx.ConnectError):
                await untrusting.get("/v1/health")
    finally:
        await server.stop()
    # The port is closed after stop().
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()
    await server.stop()  # idempotent


async def test_plain_http_and_bad_config(tmp_path: Path) -> None:
    server = ApiServer(create_app(FakeService()), host="127.0.0.1", port=0, tls=False)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/v1/health")).status_code == 200
    finally:
        await server.stop()
    with pytest.raises(ValueError):
        await ApiServer(create_app(FakeService()), host="127.0.0.1", port=0).start()  # no state_dir
    with pytest.raises(ValueError):
        await ApiServer(create_app(FakeService()), host="127.0.0.1", port=0,
                        certfile=tmp_path / "only-cert.pem").start()
