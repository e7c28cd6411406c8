"""mqtts:// with a private CA and a client certificate (the broker requires one)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import pathlib

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.dataplane import DataPlane
from agent.mqtt import MqttFrontEnd, MqttSettings
from tests.agent.mqtt_broker import (
    DEVICE,
    GOOD,
    PREFIX,
    MosquittoBroker,
    Requester,
)

pytestmark = pytest.mark.timeout(60)



def _write_key(key: ec.EllipticCurvePrivateKey, path: pathlib.Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, ip: str | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(out: pathlib.Path) -> dict[str, pathlib.Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all PEM."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("outpost-test-ca", ca_key, None, ca_key, ca=True)
    paths = {}
    for role, ip in (("server", "127.0.0.1"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"outpost-test-{role}", key, ca.subject, ca_key, ca=False, ip=ip)
        _write_key(key, out / f"{role}.key")
        (out / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"], paths[f"{role}_cert"] = out / f"{role}.key", out / f"{role}.pem"
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["ca"] = out / "ca.pem"
    return paths


async def test_mqtts_with_a_client_certificate(dataplane: DataPlane, tmp_path: pathlib.Path) -> None:
    pki = make_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "broker", extra=[
        f"cafile {pki['ca']}", f"certfile {pki['server_cert']}", f"keyfile {pki['server_key']}",
        "require_certificate true",
    ])
    broker.start()
    try:
        settings = MqttSettings.from_url(f"mqtts://127.0.0.1:{broker.port}", device_id=DEVICE,
                                         ca_path=pki["ca"], cert_path=pki["client_cert"],
                                         key_path=pki["client_key"], reconnect_min_s=0.1)
        front = MqttFrontEnd(dataplane, settings)
        await front.start()
        requester = Requester(broker.port, tls=(pki["ca"], pki["client_cert"], pki["client_key"])).connect()
        try:
            assert await front.wait_ready(20), front.status()
            requester.subscribe(f"{PREFIX}/replies/#")
            await requester.apublish(f"{PREFIX}/models/mlp/infer", GOOD, response_topic=f"{PREFIX}/replies/tls",
                                     correlation=b"t")
            reply = await requester.aget()
            assert reply.correlation == b"t" and reply.user_properties["status"] == "200"
            assert orjson.loads(reply.payload)["outputs"][0]["shape"] == [1, 10]
        finally:
            requester.close()
            await front.stop()
    finally:
        broker.stop()


# paho-mqtt 2.2 does not close its SSL socket when the handshake fails (client.py,
# _ssl_wrap_socket); it is closed when freed right after, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_untrusted_broker_certificate_is_a_clear_error(dataplane: DataPlane, tmp_path: pathlib.Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other-pki")  # a CA that did not sign the broker's certificate
    broker = MosquittoBroker(tmp_path / "broker", extra=[
        f"cafile {pki['ca']}", f"certfile {pki['server_cert']}", f"keyfile {pki['server_key']}",
    ])
    broker.start()
    try:
        settings = MqttSettings.from_url(f"mqtts://127.0.0.1:{broker.port}", device_id=DEVICE,
                                         ca_path=other["ca"], reconnect_min_s=0.05, reconnect_max_s=0.2)
        front = MqttFrontEnd(dataplane, settings)
        await front.start()
        try:
            for _ in range(1000):
                if front.status().connection.connect_failures >= 3:
                    break
                await asyncio.sleep(0.02)
            status = front.status().connection
            assert status.state == "disconnected" and status.connect_failures >= 3
            assert status.last_error is not None and "certificate verify failed" in status.last_error
        finally:
            await front.stop()
    finally:
        broker.stop()
