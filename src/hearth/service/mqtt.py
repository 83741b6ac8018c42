"""MQTT clients for the service side: one identity, one hardened TLS context.

Every service process that talks to the broker (the broker supervisor itself, ingest
workers, the command sender) authenticates twice, like a unit does: with a client
certificate issued by the service CA (mutual TLS) and with a username and random password
that the broker's dynamic-security plugin checks and binds to a role. The identity comes
from :meth:`hearth.service.broker.Broker.identity`.

Example::

    identity = broker.identity("hearth-ingest")
    client = make_client(identity, client_id=f"hearth-ingest-{worker}",
                         clean_start=False, session_expiry=3600)
    client.on_message = handle
    client.loop_start()          # connects in the network thread (parameters preset)

TLS settings (not configurable on purpose): TLS 1.2 minimum, the server certificate is
verified against the maker root CA with a host name check, the client certificate and key
are loaded from files. The password is never logged and never appears in ``repr``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hearth.errors import ConfigError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_KEEPALIVE",
    "MIN_TLS_VERSION",
    "MqttIdentity",
    "make_client",
    "tls_context",
]

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
"""The oldest TLS version any Hearth MQTT connection accepts."""
DEFAULT_KEEPALIVE = 60
"""Seconds between MQTT pings when the link is idle."""
DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds allowed for the TCP connect and the TLS handshake."""
MAX_SESSION_EXPIRY = 0xFFFFFFFF


@dataclass(frozen=True)
class MqttIdentity:
    """Everything a service process needs to connect to the broker as one identity.

    ``cafile`` is the trust anchor for the broker's server certificate (the maker root
    CA). ``password`` is excluded from ``repr``.
    """

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    client_id: str
    certfile: Path
    keyfile: Path
    cafile: Path


def tls_context(identity: MqttIdentity) -> ssl.SSLContext:
    """The client TLS context for ``identity``: TLS 1.2+, verified server, client cert.

    Raises:
        ConfigError: a certificate, key or CA file is missing or unreadable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cafile=str(identity.cafile))
        ctx.load_cert_chain(certfile=str(identity.certfile), keyfile=str(identity.keyfile))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load the TLS files of MQTT identity {identity.username!r}: {e}"
        ) from e
    return ctx


def make_client(
    identity: MqttIdentity,
    *,
    client_id: str | None = None,
    clean_start: bool = True,
    session_expiry: int = 0,
    keepalive: int = DEFAULT_KEEPALIVE,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> paho.Client:
    """A paho-mqtt 2 client (MQTT v5, callback API v2) set up for ``identity``.

    It does not connect. Host, port, keepalive, clean start and the session expiry
    interval are preset with ``connect_async``, so start it with ``client.reconnect()``
    (blocking connect; then run the network loop) or with ``loop_start()`` /
    ``loop_forever()``. ``client_id`` overrides ``identity.client_id`` (ingest workers
    each use their own).

    Raises:
        ConfigError: a TLS file is missing or unreadable, or ``session_expiry`` or
            ``connect_timeout`` is out of range.
    """
    if not 0 <= session_expiry <= MAX_SESSION_EXPIRY:
        raise ConfigError(f"session_expiry must be 0..{MAX_SESSION_EXPIRY} seconds")
    if not connect_timeout > 0:
        raise ConfigError("connect_timeout must be positive")
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id if client_id is not None else identity.client_id,
        protocol=paho.MQTTv5,
    )
    client.connect_timeout = connect_timeout
    client.tls_set_context(tls_context(identity))
    client.username_pw_set(identity.username, identity.password)
    properties: Properties | None = None
    if session_expiry:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry
    client.connect_async(
        identity.host,
        identity.port,
        keepalive=keepalive,
        clean_start=clean_start,
        properties=properties,
    )
    return client
