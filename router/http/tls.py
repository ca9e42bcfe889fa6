"""HTTPS for the listener: its SSLContext, certificates renewed on reload, and the client
certificate's name for mutual TLS.

The context is built once, from the config the service started with (`service.listen` is
read at start only). A reload rereads the same files into the same context, so a renewed
certificate serves the next handshakes without a restart and without dropping connections.
"""

from __future__ import annotations

import logging
import ssl
from typing import NoReturn

from aiohttp import web

from router.config import ConfigError, ConfigIssue
from router.config.schema import ServerTls
from router.runtime import Runtime

log = logging.getLogger(__name__)

MIN_VERSION = ssl.TLSVersion.TLSv1_2
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
           "required": ssl.CERT_REQUIRED}


class EncryptedKey(ValueError):
    """The key needs a passphrase; OpenSSL would otherwise ask for it on a terminal."""


def _no_password() -> bytes:
    raise EncryptedKey("the key is encrypted (the router takes unencrypted keys only)")


class ServerCertificates:
    """The listener's SSLContext and the files it reads; `reload()` is called by
    Runtime.reload_async, before anything is swapped, so a broken certificate refuses the reload."""

    def __init__(self, settings: ServerTls, config_file: str = "(config)"):
        self.settings = settings
        self.config_file = config_file  # named in a refused reload's issues
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = MIN_VERSION
        self.context.load_cert_chain(settings.cert_file, settings.key_file,
                                     password=_no_password)
        if settings.client_ca_file is not None:
            self.context.load_verify_locations(cafile=settings.client_ca_file)
        self.context.verify_mode = _VERIFY[settings.client_cert]

    def reload(self) -> None:
        """Reread the certificate and key into the running context, or raise ConfigError
        and keep the one it has. They are tried on a scratch context first: a failed load
        into the live one could leave it with a certificate and no key."""
        cert, key = self.settings.cert_file, self.settings.key_file
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key,
                                                                     password=_no_password)
            self.context.load_cert_chain(cert, key, password=_no_password)
        except ssl.SSLError as exc:
            self._refuse(f"not a PEM certificate and its key ({exc.reason or exc})")
        except OSError as exc:
            self._refuse(exc.strerror or str(exc))
        except EncryptedKey as exc:
            self._refuse(str(exc))
        log.info("TLS certificate reloaded from %s", cert)

    def _refuse(self, why: str) -> NoReturn:
        cert, key = self.settings.cert_file, self.settings.key_file
        raise ConfigError([ConfigIssue(
            self.config_file, None, "service.listen.tls.cert_file",
            f"cannot load {cert} with {key}: {why}; the listener keeps its certificate "
            "(it rereads the files it started with: new paths take a restart)")])


def listener_context(runtime: Runtime) -> ssl.SSLContext | None:
    """The context for the listener of the config the service started with (None: plain
    HTTP), its certificates registered with the runtime so every reload renews them."""
    settings = runtime.started.service.listen.tls
    if settings is None:
        return None
    certificates = ServerCertificates(settings, str(runtime.config_path or "(config)"))
    runtime.certificates = certificates
    return certificates.context


def peer_common_name(request: web.BaseRequest) -> str | None:
    """The subject CN of the client's certificate, or None: no TLS, no certificate, or a
    subject with no CN or more than one (ambiguous, so trusted as none). Only a certificate
    the client CA verified is ever seen here: the handshake refuses any other."""
    cert = request.get_extra_info("peercert")
    if not cert:  # None without a certificate; {} when the context does not verify them
        return None
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    return names[0] if len(names) == 1 else None
