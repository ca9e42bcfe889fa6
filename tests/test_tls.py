"""TLS: HTTPS on the listener with certificates renewed by a reload, mutual TLS for partners,
and MQTT over TLS to a private Mosquitto. Certificates are made once per module with the
openssl command: a CA, two server certificates (A and B) and a client (CN=kent), plus a
stranger that claims CN=kent but is signed by another CA."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
import yaml
from aiohttp import web
from conftest import Broker, free_port, need
from service_support import Running, make_config, running_service

from router.config import ConfigError, load_config
from router.config.schema import Mqtt, MqttTls, ServerTls
from router.http.tls import ServerCertificates, peer_common_name
from router.infra.mqtt_link import MqttLink

SERVER_EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\n"
ISSUE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<key>\S+): (?P<message>.+)$")


@dataclass(frozen=True)
class Pki:
    dir: Path

    def pem(self, name: str) -> str:
        return str(self.dir / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def der(self, name: str) -> bytes:
        return ssl.PEM_cert_to_DER_cert(Path(self.pem(name)).read_text())

    def client(self, name: str | None = None) -> ssl.SSLContext:
        """A client trusting the CA, presenting `name`'s certificate if given."""
        context = ssl.create_default_context(cafile=self.pem("ca"))
        if name is not None:
            context.load_cert_chain(self.pem(name), self.key(name))
        return context


def _openssl(where: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need(shutil.which("openssl") is not None, "the openssl command", "Debian's openssl package")
    where = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl(where, "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN={ca}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ca, ext in (("server-a", "localhost", "ca", SERVER_EXT),
                              ("server-b", "localhost", "ca", SERVER_EXT),
                              ("kent", "kent", "ca", CLIENT_EXT),
                              ("stranger", "kent", "other-ca", CLIENT_EXT)):
        _openssl(where, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}")
        (where / f"{name}.ext").write_text(ext)
        _openssl(where, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
                 "-CAkey", f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem",
                 "-days", "2", "-extfile", f"{name}.ext")
    _openssl(where, "pkey", "-in", "kent.key", "-aes256", "-passout", "pass:secret",
             "-out", "encrypted.key")
    return Pki(where)


def _install(pki: Pki, name: str, tmp: Path, *, key_of: str | None = None) -> tuple[str, str]:
    """Put `name`'s certificate (and `key_of`'s key) where the config points, as a renewal
    would: the same paths, new contents."""
    live = tmp / "tls"
    live.mkdir(exist_ok=True)
    shutil.copyfile(pki.pem(name), live / "server.pem")
    shutil.copyfile(pki.key(key_of or name), live / "server.key")
    return str(live / "server.pem"), str(live / "server.key")


def _https_config(tmp: Path, pki: Pki, **tls: Any) -> Path:
    cert, key = _install(pki, "server-a", tmp)
    return make_config(tmp, listen={"host": "127.0.0.1", "port": 0,
                                    "tls": {"cert_file": cert, "key_file": key, **tls}})


@contextlib.asynccontextmanager
async def https_service(path: Path, pki: Pki) -> AsyncIterator[tuple[Running, int]]:
    async with running_service(path) as api:
        port = int(api.base.rpartition(":")[2])
        api.base = f"https://localhost:{port}"
        yield api, port


async def served_certificate(port: int, pki: Pki) -> bytes:
    """The certificate a new TLS connection to the port is shown (DER)."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.client(), server_hostname="localhost"), 5)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), 5)
    assert isinstance(der, bytes)
    return der


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_https_serves_and_a_reload_renews_the_certificate(
        tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    path = _https_config(tmp_path, pki)
    caplog.set_level(logging.INFO)
    async with https_service(path, pki) as (api, port):
        assert "serving on https://127.0.0.1" in caplog.text
        assert await api.call("GET", "/healthz", ssl=pki.client()) == (200, {"status": "ok"})
        assert await served_certificate(port, pki) == pki.der("server-a")

        _install(pki, "server-b", tmp_path)  # renewed in place
        status, body = await api.call("POST", "/v1/admin/reload", "manager", ssl=pki.client())
        assert (status, body["restart_required"]) == (200, []), body
        assert await served_certificate(port, pki) == pki.der("server-b")
        assert (await api.call("GET", "/healthz", ssl=pki.client()))[0] == 200

        # plain HTTP to the TLS port is refused without a traceback in the log
        with pytest.raises(aiohttp.ClientError):
            async with api.session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                await resp.read()
    assert _errors(caplog) == []


async def test_a_broken_certificate_refuses_the_reload_and_keeps_the_served_one(
        tmp_path: Path, pki: Pki) -> None:
    path = _https_config(tmp_path, pki)
    async with https_service(path, pki) as (api, port):
        # renewed with a key that is not the certificate's: the new config is refused
        _install(pki, "server-b", tmp_path, key_of="server-a")
        status, body = await api.call("POST", "/v1/admin/reload", "manager", ssl=pki.client())
        assert (status, body["error"]) == (422, "config_invalid"), body
        assert any(": service.listen.tls.key_file: " in i and "does not match" in i
                   for i in body["issues"]), body
        assert await served_certificate(port, pki) == pki.der("server-a")

        # the config now names good files elsewhere (valid), but the listener rereads the
        # files it started with, which are broken: refused too, the running one kept
        raw = yaml.safe_load(path.read_text())
        raw["service"]["listen"]["tls"].update(cert_file=pki.pem("server-b"),
                                               key_file=pki.key("server-b"))
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        status, body = await api.call("POST", "/v1/admin/reload", "manager", ssl=pki.client())
        assert (status, body["error"]) == (422, "config_invalid"), body
        assert [i.split(": ")[1] for i in body["issues"]] == ["service.listen.tls.cert_file"]
        assert "keeps its certificate" in body["issues"][0]
        assert await served_certificate(port, pki) == pki.der("server-a")
        assert (await api.call("GET", "/healthz", ssl=pki.client()))[0] == 200

        # mended: the next reload takes it (and says the new paths wait for a restart)
        _install(pki, "server-b", tmp_path)
        status, body = await api.call("POST", "/v1/admin/reload", "manager", ssl=pki.client())
        assert status == 200, body
        assert body["restart_required"] == ["service.listen.tls.cert_file",
                                            "service.listen.tls.key_file"]
        assert await served_certificate(port, pki) == pki.der("server-b")


@contextlib.asynccontextmanager
async def cn_echo(settings: ServerTls) -> AsyncIterator[tuple[int, int]]:
    """An app answering with peer_common_name(request), over TLS and plain HTTP."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"cn": peer_common_name(request)})

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        context = ServerCertificates(settings).context
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        (_, tls), (_, plain) = runner.addresses
        yield tls, plain
    finally:
        await runner.cleanup()


async def _cn(url: str, context: ssl.SSLContext | None = None) -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
            session.get(url, ssl=context if context is not None else True) as resp:
        assert resp.status == 200
        return (await resp.json())["cn"]


async def test_peer_common_name_is_the_verified_client_certificates_cn(
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    base = {"cert_file": pki.pem("server-a"), "key_file": pki.key("server-a"),
            "client_ca_file": pki.pem("ca")}
    async with cn_echo(ServerTls(**base, client_cert="optional")) as (tls, plain):
        url = f"https://localhost:{tls}/"
        assert await _cn(url, pki.client("kent")) == "kent"
        assert await _cn(url, pki.client()) is None  # optional: no certificate, no name
        assert await _cn(f"http://127.0.0.1:{plain}/") is None
        with pytest.raises(aiohttp.ClientError):  # CN=kent, but not signed by our CA
            await _cn(url, pki.client("stranger"))
    async with cn_echo(ServerTls(**base, client_cert="required")) as (tls, _):
        url = f"https://localhost:{tls}/"
        assert await _cn(url, pki.client("kent")) == "kent"
        with pytest.raises(aiohttp.ClientError):
            await _cn(url, pki.client())
    assert _errors(caplog) == []


async def test_a_partner_token_bound_to_its_client_certificate_is_refused_without_it(
        tmp_path: Path, pki: Pki) -> None:
    path = _https_config(tmp_path, pki, client_ca_file=pki.pem("ca"), client_cert="optional")
    raw = yaml.safe_load(path.read_text())
    for token in raw["service"]["tokens"]:
        if token["role"] == "partner:kent":
            token["client_cert"] = "kent"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    async with https_service(path, pki) as (api, _):
        with_cert, without = pki.client("kent"), pki.client()
        assert (await api.call("GET", "/v1/handoffs", "partner:kent", ssl=with_cert))[0] == 200
        status, err = await api.call("GET", "/v1/handoffs", "partner:kent", ssl=without)
        assert (status, err["error"]) == (401, "unauthorized")  # a stolen token alone: nothing
        # tokens not bound to a certificate still work without one
        assert (await api.call("GET", "/v1/handoffs", "viewer", ssl=without))[0] == 200
        with pytest.raises(aiohttp.ClientError):  # CN=kent from another CA: no handshake
            await api.call("GET", "/v1/handoffs", "partner:kent", ssl=pki.client("stranger"))


def _tls_issues(tmp_path: Path, section: str, tls: dict[str, Any]) -> list[str]:
    path = make_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    (raw["service"]["listen"] if section == "listen" else raw["mqtt"])["tls"] = tls
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = path.read_text().splitlines()
    for issue in err.value.issues:  # FILE:LINE: key: message, the line holding the key
        match = ISSUE.match(str(issue))
        assert match and match["file"] == str(path), str(issue)
        assert issue.line is not None
        assert issue.key.rpartition(".")[2] + ":" in lines[issue.line - 1], str(issue)
    return [f"{i.key}: {i.message}" for i in err.value.issues]


def test_tls_settings_are_checked_when_the_config_is_read(tmp_path: Path, pki: Pki) -> None:
    server = {"cert_file": pki.pem("server-a"), "key_file": pki.key("server-a")}
    missing = str(tmp_path / "nowhere.pem")
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("listen", {**server, "cert_file": missing},
         f"service.listen.tls.cert_file: cannot read {missing}: No such file or directory"),
        ("listen", {**server, "cert_file": pki.key("server-a")},
         f"service.listen.tls.cert_file: {pki.key('server-a')} holds no PEM certificate"),
        ("listen", {**server, "key_file": pki.key("kent")},
         f"service.listen.tls.key_file: {pki.key('kent')} is not the key of "
         f"{pki.pem('server-a')}: it does not match the certificate"),
        ("listen", {**server, "key_file": pki.pem("server-a")},
         f"service.listen.tls.key_file: {pki.pem('server-a')} is not the key of "
         f"{pki.pem('server-a')}: it is not a PEM private key"),
        ("listen", {"cert_file": pki.pem("kent"), "key_file": str(pki.dir / "encrypted.key")},
         f"service.listen.tls.key_file: {pki.dir / 'encrypted.key'} is not the key of "
         f"{pki.pem('kent')}: it is encrypted (the router takes unencrypted keys only)"),
        ("listen", {**server, "client_cert": "required"},
         "service.listen.tls.client_cert: required needs client_ca_file, the CA that signs "
         "the clients' certificates"),
        ("listen", {**server, "client_ca_file": pki.pem("ca")},
         "service.listen.tls.client_ca_file: unused while client_cert is none "
         "(set client_cert: optional or required)"),
        ("listen", {**server, "client_ca_file": pki.key("ca"), "client_cert": "optional"},
         f"service.listen.tls.client_ca_file: {pki.key('ca')} holds no PEM certificate"),
        ("mqtt", {"ca_file": missing},
         f"mqtt.tls.ca_file: cannot read {missing}: No such file or directory"),
        ("mqtt", {"ca_file": pki.pem("ca"), "cert_file": pki.pem("kent")},
         "mqtt.tls.cert_file: needs key_file, the certificate's private key"),
        ("mqtt", {"ca_file": pki.pem("ca"), "cert_file": pki.pem("kent"),
                  "key_file": pki.key("stranger")},
         f"mqtt.tls.key_file: {pki.key('stranger')} is not the key of {pki.pem('kent')}: "
         "it does not match the certificate"),
    ]
    for section, tls, expected in cases:
        assert _tls_issues(tmp_path, section, tls) == [expected]


def test_a_valid_tls_config_loads(tmp_path: Path, pki: Pki) -> None:
    path = _https_config(tmp_path, pki, client_ca_file=pki.pem("ca"), client_cert="required")
    raw = yaml.safe_load(path.read_text())
    raw["mqtt"]["tls"] = {"ca_file": pki.pem("ca"), "cert_file": pki.pem("kent"),
                          "key_file": pki.key("kent")}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(path)
    assert config.service.listen.tls is not None
    assert config.service.listen.tls.client_cert == "required"
    assert config.mqtt.tls is not None and config.mqtt.tls.key_file == pki.key("kent")


@contextlib.contextmanager
def tls_broker(tmp: Path, pki: Pki) -> Iterator[Broker]:
    """A private Mosquitto whose only listener speaks TLS and wants a client certificate."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    need(Path(binary).exists(), "the mosquitto binary", "Debian's mosquitto package")
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {pki.pem('ca')}\ncertfile {pki.pem('server-a')}\nkeyfile {pki.key('server-a')}\n"
        "require_certificate true\nallow_anonymous true\npersistence false\n"
        # as root, Mosquitto would drop to its own user, who cannot read the test's keys
        + ("user root\n" if os.geteuid() == 0 else ""))
    broker = Broker(port, conf)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.services
async def test_mqtt_over_tls_publishes_retained_state_and_plain_tcp_is_refused(
        tmp_path: Path, pki: Pki) -> None:
    with tls_broker(tmp_path, pki) as broker:
        path = make_config(tmp_path, mqtt_port=broker.port)
        raw = yaml.safe_load(path.read_text())
        raw["mqtt"]["tls"] = {"ca_file": pki.pem("ca"), "cert_file": pki.pem("kent"),
                              "key_file": pki.key("kent")}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with running_service(path) as api:
            link = api.service.mqtt
            assert link is not None
            await api.call("PUT", "/v1/forces/met/override", "manager",
                           json={"state": "down", "reason": "CAD crash"})
            for _ in range(200):
                if link.connected and link.pending == 0:
                    break
                await asyncio.sleep(0.05)
            assert link.connected and link.pending == 0

            async with aiomqtt.Client(broker.host, broker.port, timeout=5,
                                      tls_context=pki.client("kent")) as client:
                await client.subscribe("overflow/state/met")
                async with asyncio.timeout(5):
                    async for message in client.messages:
                        assert message.retain
                        state = json.loads(bytes(message.payload))
                        break
            assert state["state"] == "down"

        with pytest.raises(aiomqtt.MqttError):  # plain MQTT to the TLS listener
            async with aiomqtt.Client(broker.host, broker.port, timeout=2):
                pass


def test_mqtt_tls_files_broken_after_validation_keep_the_running_context(
        tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """A reload validated the files, then they broke before the link reread them: the link
    keeps its context and settings rather than failing mid-swap."""
    ca = tmp_path / "ca.pem"
    shutil.copyfile(pki.pem("ca"), ca)
    settings = Mqtt(tls=MqttTls(ca_file=str(ca), cert_file=pki.pem("kent"),
                                key_file=pki.key("kent")))
    link = MqttLink(settings, environ={})
    before = link._tls
    assert before is not None and before.minimum_version == ssl.TLSVersion.TLSv1_2
    ca.write_text("not a certificate\n")
    assert link.reconfigure(settings.model_copy(update={"port": 8883}), {}) is False
    assert link._tls is before and link.settings is settings
    assert "keeping the running settings" in caplog.text
