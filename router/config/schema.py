"""The shape of `forces.yaml`: every setting, its type, its bounds and its default.

Pydantic models, frozen once validated: the rest of the router only ever sees a
`RouterConfig` that passed (router/config/load.py reads the file and reports errors).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from router.config.health import Health, PosFloat
from router.engine.model import Service

FORCE_ID = r"^[a-z][a-z0-9_]{1,31}$"
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
Priority = Literal["P1", "P2", "P3", "P4"]  # of an incident handoff; P1 most urgent

NonNegInt = Annotated[int, Field(ge=0)]
SIP_URI = r"^sips?:[^\s]+$"
ROLE = r"^(telephony|viewer|manager|partner:[a-z][a-z0-9_]*)$"
MQTT_PREFIX = r"^[^#+]*/$"
HTTP_URL = r"^https?://[^\s/]+(/\S*)?$"


def _port_problem(hostport: str) -> str | None:
    """What is wrong with the port of a `host:port` (or bracketed IPv6), if it has one."""
    host, sep, port = hostport.rpartition(":")
    if sep and port.isdigit() and not host.endswith(":") and not 1 <= int(port) <= 65535:
        return f"port {int(port)} is out of range (1-65535)"
    return None


def _sip_port(uri: str) -> str:
    problem = _port_problem(uri.split("@")[-1].split(";")[0].split("?")[0])
    if problem:
        raise ValueError(problem)
    return uri


def _url_port(url: str) -> str:
    problem = _port_problem(url.split("/")[2])
    if problem:
        raise ValueError(problem)
    return url


SipUri = Annotated[str, Field(pattern=SIP_URI), AfterValidator(_sip_port)]
WebUrl = Annotated[str, Field(pattern=HTTP_URL), AfterValidator(_url_port)]

# how a pattern's failure is explained (config errors name the rule, not the regex)
PATTERN_MESSAGES = {
    SIP_URI: "must be a SIP URI such as sip:999@cc.force.example",
    FORCE_ID: "a force id is 2 to 32 lower-case letters, digits or _, starting with a letter",
    ROLE: "must be telephony, viewer, manager or partner:FORCE",
    MQTT_PREFIX: "must end with / and contain no + or #",
    HTTP_URL: "must be an http:// or https:// URL",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- centre capacity, overload and health ---------------------------------------------------


class OverloadLevels(Strict):
    """Telemetry levels; a centre is overloaded when any `enter` level is reached."""

    calls_waiting: NonNegInt | None = None
    oldest_wait_s: Annotated[float, Field(ge=0)] | None = None
    handlers_available_below: NonNegInt | None = None


class Overload(Strict):
    enter: OverloadLevels
    leave: OverloadLevels

    @model_validator(mode="after")
    def _hysteresis(self) -> Overload:
        """`leave` must lie strictly on the calm side of `enter`, or a centre at the level
        would enter and leave overload on the same reading."""
        if all(v is None for v in self.enter.model_dump().values()):
            raise ValueError("enter: names no level, so the centre could never be overloaded")
        e, lv = self.enter, self.leave
        for key, entered, left in (("calls_waiting", e.calls_waiting, lv.calls_waiting),
                                   ("oldest_wait_s", e.oldest_wait_s, lv.oldest_wait_s)):
            if entered is not None and left is not None and left >= entered:
                raise ValueError(f"leave.{key}: {left:g} must be below enter.{key} "
                                 f"({entered:g}), or overload would never settle")
        entered, left = e.handlers_available_below, lv.handlers_available_below
        if entered is not None and left is not None and left < entered:
            raise ValueError(f"leave.handlers_available_below: {left} must be at least "
                             f"enter.handlers_available_below ({entered})")
        return self


class Probe(Strict):
    """An active check. `component` says which half of the centre it proves alive."""

    kind: Literal["http", "sip", "tcp"]
    target: str = Field(min_length=1)  # URL for http, host:port for sip and tcp
    component: Literal["telephony", "cad"]
    interval_s: PosFloat | None = None
    timeout_s: PosFloat | None = None

    @model_validator(mode="after")
    def _target_shape(self) -> Probe:
        if self.kind == "http" and not re.match(r"^https?://", self.target):
            raise ValueError(f"target: an http probe needs an http(s):// URL, got {self.target!r}")
        if self.kind != "http" and not re.match(r"^[^\s:]+:\d{1,5}$", self.target):
            raise ValueError(f"target: a {self.kind} probe needs host:port, got {self.target!r}")
        problem = _port_problem(self.target if self.kind != "http" else self.target.split("/")[2])
        if problem:
            raise ValueError(f"target: {problem}")
        return self


class Shed101(Strict):
    """Where a 101 call goes when no one can take it: the home queue, or an announcement
    (used when the home centre itself is unreachable)."""

    queue: SipUri
    announcement: SipUri


class Centre(Strict):
    handlers_on_duty: NonNegInt
    overflow_queue: NonNegInt  # calls waiting beyond which, when overloaded, the excess overflows
    max_queue: NonNegInt  # calls waiting at home beyond which even a normal centre overflows
    answer_target_s: PosFloat = 10.0
    overload: Overload | None = None
    on_cad_down: Literal["keep", "overflow"] = "keep"
    probes: tuple[Probe, ...] = ()
    telemetry: bool = True
    shed_101: Shed101

    @model_validator(mode="after")
    def _queues(self) -> Centre:
        if self.overflow_queue > self.max_queue:
            raise ValueError(
                f"overflow_queue: {self.overflow_queue} is more than max_queue "
                f"({self.max_queue}): an overloaded centre would never overflow early"
            )
        return self


class MutualAid(Strict):
    """What a force gives to others: how many concurrent calls, while its queue is short."""

    max_concurrent: NonNegInt
    only_while_queue_below: NonNegInt
    services: tuple[Service, ...] = (Service.EMERGENCY, Service.NON_EMERGENCY)
    reserve_999: NonNegInt = 0

    @model_validator(mode="after")
    def _reserve(self) -> MutualAid:
        if self.reserve_999 > self.max_concurrent:
            raise ValueError(
                f"reserve_999: {self.reserve_999} is more than max_concurrent "
                f"({self.max_concurrent}): the 999 reserve is part of that cap"
            )
        return self


class Route(Strict):
    """A partner for one service. Weighted partners share the overflow in proportion; a
    `standby` partner is used only when no weighted one can help."""

    to: str
    weight: int | None = None
    standby: bool = False
    max_concurrent: NonNegInt | None = None  # cap on this origin's calls at this partner

    @model_validator(mode="after")
    def _weight_or_standby(self) -> Route:
        if self.standby:
            if self.weight is not None:
                raise ValueError("weight: a standby partner has no weight (it is used only "
                                 "when no weighted partner can help)")
        elif self.weight is None:
            raise ValueError("weight: required (or standby: true)")
        elif self.weight < 1:
            raise ValueError(f"weight: {self.weight} would never choose {self.to}; write "
                             "standby: true for a partner used only when no weighted one can "
                             "help, or remove the route")
        return self

    @property
    def share_weight(self) -> int:
        """The round robin's weight: 0 marks a standby partner."""
        return self.weight or 0


class Cad(Strict):
    adapter: str = Field(min_length=1)
    options: dict[str, Any] = {}


class Force(Strict):
    name: str = Field(min_length=1)
    centre: Centre
    sip: dict[Service, SipUri]
    cad: Cad
    mutual_aid: MutualAid
    overflow: dict[Service, tuple[Route, ...]]
    notify_url: WebUrl | None = None  # partner hook: diversion started, changed, stopped

    @field_validator("sip", "overflow")
    @classmethod
    def _both_services(cls, value: dict[Service, Any]) -> dict[Service, Any]:
        missing = [s.value for s in Service if s not in value]
        if missing:
            raise ValueError(f"missing service {' and '.join(missing)}: every force needs "
                             "both 999 and 101")
        return value


# ---- service-wide settings ------------------------------------------------------------------


class RateLimit(Strict):
    """A token bucket: `per_s` requests a second on average, bursts of up to `burst`."""

    per_s: PosFloat
    burst: Annotated[int, Field(ge=1)]


class Token(Strict):
    """One credential. Secrets live in environment variables, never in this file."""

    env: str
    role: str = Field(pattern=ROLE)
    # partners: handoffs must carry an HMAC-SHA256 signature made with this variable's key
    signing_key_env: str | None = None
    # None: the role's default (telephony unlimited: a route is never refused); "off": none
    rate_limit: RateLimit | Literal["off"] | None = None
    max_body_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] | None = None
    # mutual TLS: the subject CN of the verified client certificate this token must come with
    client_cert: str | None = Field(default=None, min_length=1)
    # the person (or desk) a manager's token belongs to, recorded with every declaration; a
    # token shared by a control room names none, and each declaration then says who made it
    operator: str | None = Field(default=None, min_length=1, max_length=100,
                                 pattern=r"^[^\x00-\x1f\x7f]+$")

    @field_validator("env", "signing_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.match(value):
            raise ValueError(f"not an environment variable name: {value!r}")
        return value

    @model_validator(mode="after")
    def _signing(self) -> Token:
        if self.signing_key_env is not None and not self.role.startswith("partner:"):
            raise ValueError("signing_key_env: only partners sign (their handoffs)")
        return self


class TlsFiles(Strict):
    """Base of the TLS settings: their files are opened and parsed when the config is read,
    so a missing or broken one is refused with its key's line (at start, or by a reload that
    then keeps the running certificate) rather than found at the first handshake. Paths are
    relative to the working directory, like the config's other paths."""

    @staticmethod
    def _readable(key: str, path: str) -> None:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None

    @staticmethod
    def _check_ca(key: str, path: str) -> None:
        import ssl  # only TLS settings need it

        TlsFiles._readable(key, path)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        except ssl.SSLError:
            raise ValueError(f"{key}: {path} holds no PEM certificate") from None

    @staticmethod
    def _check_pair(cert_file: str, key_file: str) -> None:
        import ssl

        TlsFiles._check_ca("cert_file", cert_file)
        TlsFiles._readable("key_file", key_file)

        def no_password() -> bytes:  # never prompt on a terminal: the service has none
            raise ValueError("it is encrypted (the router takes unencrypted keys only)")

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                cert_file, key_file, password=no_password)
        except (ssl.SSLError, ValueError) as exc:
            why = str(exc) if isinstance(exc, ValueError) else (
                "it does not match the certificate" if exc.reason == "KEY_VALUES_MISMATCH"
                else "it is not a PEM private key")
            raise ValueError(f"key_file: {key_file} is not the key of {cert_file}: "
                             f"{why}") from None


class ServerTls(TlsFiles):
    """HTTPS for the listener, TLS 1.2 or later. With `client_ca_file`, clients may
    (`optional`) or must (`required`) show a certificate that CA signed, and its subject CN
    is known to the auth layer (mutual TLS for partners)."""

    cert_file: str = Field(min_length=1)  # PEM: the certificate, then any intermediates
    key_file: str = Field(min_length=1)  # PEM, unencrypted; both reread on every reload
    client_ca_file: str | None = None
    client_cert: Literal["none", "optional", "required"] = "none"

    @model_validator(mode="after")
    def _files_load(self) -> ServerTls:
        if self.client_cert != "none" and self.client_ca_file is None:
            raise ValueError(f"client_cert: {self.client_cert} needs client_ca_file, the CA "
                             "that signs the clients' certificates")
        if self.client_ca_file is not None and self.client_cert == "none":
            raise ValueError("client_ca_file: unused while client_cert is none "
                             "(set client_cert: optional or required)")
        self._check_pair(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            self._check_ca("client_ca_file", self.client_ca_file)
        return self


class Listen(Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    tls: ServerTls | None = None  # absent: plain HTTP
    # a connection must complete each request head this soon after opening or after its
    # previous response, or it is closed (slow clients, idle keep-alive connections)
    header_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0


class ServiceSettings(Strict):
    listen: Listen = Listen()
    max_call_duration_s: PosFloat = 3600.0
    tokens: tuple[Token, ...] = ()
    audit_log: str = "var/audit.jsonl"  # declarations and state changes


class MqttTls(TlsFiles):
    """TLS to the broker, TLS 1.2 or later: its certificate must be signed by `ca_file` and
    name `mqtt.host`; `cert_file` and `key_file`, together, are the router's own."""

    ca_file: str = Field(min_length=1)
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _files_load(self) -> MqttTls:
        self._check_ca("ca_file", self.ca_file)
        if self.cert_file is None and self.key_file is not None:
            raise ValueError("key_file: needs cert_file, the certificate it is the key of")
        if self.cert_file is not None and self.key_file is None:
            raise ValueError("cert_file: needs key_file, the certificate's private key")
        if self.cert_file is not None and self.key_file is not None:
            self._check_pair(self.cert_file, self.key_file)
        return self


class Mqtt(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    prefix: str = Field(default="overflow/", pattern=MQTT_PREFIX)
    username_env: str | None = None
    password_env: str | None = None
    tls: MqttTls | None = None  # absent: plain TCP


class HandoffRetry(Strict):
    """Delivery attempts to a CAD: exponential backoff with jitter between attempts, each
    attempt bounded; after `attempts` failures the destination's backlog is held and one
    handoff is tried every `hold_probe_s` until one gets through (or the CAD is seen back)."""

    attempts: Annotated[int, Field(ge=1)] = 4
    initial_s: PosFloat = 0.2
    max_s: PosFloat = 5.0
    attempt_timeout_s: PosFloat = 5.0
    hold_probe_s: PosFloat = 5.0


class Handoff(Strict):
    store: str = "sqlite:///var/handoffs.db"
    spool_dir: str = "var/spool"
    deadlines_s: dict[Priority, PosFloat] = {
        "P1": 60.0,
        "P2": 300.0,
        "P3": 1800.0,
        "P4": 7200.0,
    }
    # after delivery, a dispatcher must accept or reject within this, or it escalates
    ack_deadlines_s: dict[Priority, PosFloat] = {"P1": 120.0, "P2": 600.0}
    # a rejected handoff goes back to its sender (final), or on to the destination's next
    # overflow partner for its service that has not seen it (then back, once none is left)
    on_reject: Literal["return", "next_partner"] = "return"
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    retry: HandoffRetry = HandoffRetry()


class RouterConfig(Strict):
    version: Literal[1]
    service: ServiceSettings = ServiceSettings()
    mqtt: Mqtt = Mqtt()
    health: Health = Health()
    handoff: Handoff = Handoff()
    forces: dict[Annotated[str, Field(pattern=FORCE_ID)], Force] = Field(min_length=1)
