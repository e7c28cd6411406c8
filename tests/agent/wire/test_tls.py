"""The default transport verifies TLS: the fleet's own app behind a certificate from a private CA."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import ssl
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.fleet_client import FleetClient
from agent.fleet_errors import AuthFailed, FleetUnreachable
from fleet.config import ServerConfig
from fleet.server import make_app


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
          issuer: x509.Name | None, ca: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
async def tls_fleet(tmp_path: pathlib.Path) -> AsyncIterator[tuple[str, pathlib.Path]]:
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("outpost test CA", ca_key, ca_key, None, ca=True)
    srv = _cert("127.0.0.1", srv_key, ca_key, ca.subject, ca=False)
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    (tmp_path / "srv.pem").write_bytes(_pem(srv))
    (tmp_path / "srv.key").write_bytes(_pem(srv_key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    app = make_app(ServerConfig(data_dir=tmp_path / "fleet", db_url=f"sqlite+aiosqlite:///{tmp_path / 'f.db'}"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}", tmp_path / "ca.pem"
    finally:
        await runner.cleanup()


async def test_a_fleet_certificate_from_the_configured_ca_is_trusted_and_no_other(
        tls_fleet: tuple[str, pathlib.Path]) -> None:
    url, ca_file = tls_fleet
    async with FleetClient(url, "d", "", ca_file=ca_file) as client:
        with pytest.raises(AuthFailed):  # TLS done; the fleet itself answered (no credential)
            await client.fleet_key()
    async with FleetClient(url, "d", "") as client:
        with pytest.raises(FleetUnreachable, match="certificate"):
            await client.fleet_key()
