"""The device <-> cloud contract: topics, message schemas, model specs and limits.

This is the only module the device runtime and the service share. Everything that crosses
the link is JSON, validated from raw bytes with pydantic v2 in strict mode (unknown fields
refused) and then against the model's physical ranges. Every refusal raises
:class:`hearth.errors.ValidationError` with one of the stable :class:`Reason` codes.

Topics (``{id}`` is the unit's device id, which is also its certificate CN and MQTT
username)::

    hearth/v1/d/{id}/telemetry     unit -> cloud   Telemetry
    hearth/v1/d/{id}/event         unit -> cloud   Event
    hearth/v1/d/{id}/cmd           cloud -> unit   Command
    hearth/v1/d/{id}/cmd/result    unit -> cloud   CommandResult
    hearth/v1/d/{id}/update/check  unit -> cloud   UpdateCheck  (asks for an update token)
    hearth/v1/d/{id}/update/offer  cloud -> unit   UpdateOffer  (token, assigned release)

Example::

    msg = parse_telemetry(raw_bytes, topic_device_id=device_id, model=MODELS["thermostat"])
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from hearth.errors import ValidationError

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_READINGS",
    "MODELS",
    "SYSTEM_COMMANDS",
    "TOPIC_PREFIX",
    "Command",
    "CommandResult",
    "CommandSpec",
    "Event",
    "ModelSpec",
    "ReadingSpec",
    "Reason",
    "Telemetry",
    "UpdateCheck",
    "UpdateOffer",
    "command_spec",
    "command_topic",
    "device_topic",
    "new_command_id",
    "owner_verifier",
    "parse_command",
    "parse_command_result",
    "parse_event",
    "parse_telemetry",
    "parse_topic",
    "parse_update_check",
    "parse_update_offer",
    "update_topic",
    "validate_values",
]

# --- limits ---------------------------------------------------------------------------
MAX_PAYLOAD_BYTES = 16 * 1024
"""Largest message accepted in either direction."""
MAX_READINGS = 32
"""Most readings (or command parameters) in one message."""
MAX_FUTURE_SKEW = dt.timedelta(minutes=5)
"""A message stamped further ahead than this is refused (clock skew allowance)."""
EARLIEST_TIMESTAMP = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
MAX_SEQ = 2**63 - 1
COMMAND_TTL = dt.timedelta(minutes=5)

TOPIC_PREFIX = "hearth/v1/d"
_TOPIC_RE = re.compile(  # fullmatch only: "$" alone would let a trailing newline through
    r"hearth/v1/d/([0-9a-f]{32})/(telemetry|event|cmd|cmd/result|update/check|update/offer)")
_NAME = r"^[a-z][a-z0-9_]{0,31}$"
_DEVICE_ID = r"^[0-9a-f]{32}$"
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,32}\Z")


class Reason(enum.StrEnum):
    """Stable reason codes for refused input (counted, stored in quarantine)."""

    PAYLOAD_TOO_LARGE = "payload_too_large"
    MALFORMED_JSON = "malformed_json"
    INVALID_SCHEMA = "invalid_schema"
    UNKNOWN_FIELD = "unknown_field"
    DEVICE_MISMATCH = "device_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_TOPIC = "unknown_topic"
    UNKNOWN_READING = "unknown_reading"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"
    TOO_MANY_READINGS = "too_many_readings"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    REPLAYED_SEQUENCE = "replayed_sequence"
    UNKNOWN_COMMAND = "unknown_command"
    EXPIRED = "expired"
    REVOKED = "revoked"


# --- topics -----------------------------------------------------------------------------
def device_topic(device_id: str, kind: str) -> str:
    """``hearth/v1/d/{device_id}/{kind}`` for kind in telemetry, event, cmd, cmd/result."""
    topic = f"{TOPIC_PREFIX}/{device_id}/{kind}"
    if not _TOPIC_RE.fullmatch(topic):
        raise ValueError(f"not a valid device topic: {topic!r}")
    return topic


def command_topic(device_id: str) -> str:
    return device_topic(device_id, "cmd")


def parse_topic(topic: str) -> tuple[str, str]:
    """Split a device topic into ``(device_id, kind)``; refuses anything else."""
    m = _TOPIC_RE.fullmatch(topic)
    if not m:
        raise ValidationError(Reason.UNKNOWN_TOPIC, "topic is not a Hearth device topic")
    return m.group(1), m.group(2)


# --- model specs --------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadingSpec:
    """One reading or parameter: its type, unit and physical range."""

    kind: Literal["number", "bool", "enum", "token"]
    """``token``: an opaque 16-32 character URL-safe string (identifiers, verifiers; never
    a secret in clear - see :func:`owner_verifier`)."""
    unit: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    description: str = ""

    def check(self, name: str, value: object) -> None:
        lo, hi = self.min, self.max
        if (self.kind == "number" and type(value) is float and lo is not None
                and hi is not None and lo <= value <= hi):
            return  # the common case, first (NaN and ±inf fail the bounds)
        if self.kind == "token":
            if not isinstance(value, str) or not _TOKEN_RE.match(value):
                raise ValidationError(
                    Reason.WRONG_TYPE, f"{name} must be 16-32 URL-safe characters"
                )
            return
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValidationError(Reason.WRONG_TYPE, f"{name} must be true or false")
            return
        if self.kind == "enum":
            if not isinstance(value, str):
                raise ValidationError(Reason.WRONG_TYPE, f"{name} must be a string")
            if value not in self.choices:
                raise ValidationError(
                    Reason.OUT_OF_RANGE, f"{name} must be one of {', '.join(self.choices)}"
                )
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(Reason.WRONG_TYPE, f"{name} must be a number")
        if not math.isfinite(value):
            raise ValidationError(Reason.OUT_OF_RANGE, f"{name} must be finite")
        if (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            raise ValidationError(
                Reason.OUT_OF_RANGE,
                f"{name}={value} is outside {self.min}..{self.max} {self.unit}".rstrip(),
            )


@dataclass(frozen=True)
class CommandSpec:
    params: Mapping[str, ReadingSpec] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """What a product model reports and accepts."""

    name: str
    readings: Mapping[str, ReadingSpec]
    commands: Mapping[str, CommandSpec]
    description: str = ""


THERMOSTAT = ModelSpec(
    name="thermostat",
    description="Room thermostat with a heater relay",
    readings={
        "temperature": ReadingSpec("number", "°C", -40.0, 85.0, description="room temperature"),
        "humidity": ReadingSpec("number", "%", 0.0, 100.0, description="relative humidity"),
        "heater": ReadingSpec("bool", description="heater relay on/off"),
        "target": ReadingSpec("number", "°C", 5.0, 35.0, description="target temperature"),
    },
    commands={
        "set_target": CommandSpec(
            {"target": ReadingSpec("number", "°C", 5.0, 35.0)}, "set the target temperature"
        ),
    },
)

LOCK = ModelSpec(
    name="lock",
    description="Door lock with a door sensor",
    readings={
        "lock": ReadingSpec("enum", choices=("locked", "unlocked"), description="bolt state"),
        "door": ReadingSpec("enum", choices=("open", "closed"), description="door sensor"),
        "battery": ReadingSpec("number", "%", 0.0, 100.0, description="battery level"),
    },
    commands={
        "lock": CommandSpec({}, "throw the bolt"),
        "unlock": CommandSpec({}, "withdraw the bolt"),
    },
)

MODELS: Mapping[str, ModelSpec] = {m.name: m for m in (THERMOSTAT, LOCK)}

SYSTEM_COMMANDS: Mapping[str, CommandSpec] = {
    "bind_owner": CommandSpec(
        {"owner": ReadingSpec("token"), "verifier": ReadingSpec("token")},
        "bind the unit to its owner: an opaque owner reference and the verifier (a hash) "
        "of the owner's local-access credential",
    ),
    "unbind_owner": CommandSpec(
        {"owner": ReadingSpec("token")}, "forget the owner binding if it is this owner's"
    ),
    "factory_reset": CommandSpec(
        {}, "erase the owner binding, local user data and queued personal data; keep the "
        "unit's identity"
    ),
    "acknowledge_alert": CommandSpec(
        {}, "an operator acted on the unit's integrity alert: lift its quarantine"
    ),
    "check_updates": CommandSpec({}, "ask the service for an update now"),
}
"""Commands every model accepts, sent only by the service itself (claiming, release, reset);
never through the operator or consumer command routes. A unit whose firmware predates one
answers ``unknown_command`` (backwards compatible)."""


def command_spec(model: ModelSpec, name: str) -> CommandSpec | None:
    """The spec of command ``name`` for ``model``: a system command or one of the model's."""
    return SYSTEM_COMMANDS.get(name) or model.commands.get(name)


def owner_verifier(credential: str) -> str:
    """What the service sends and the unit stores for an owner's local-access credential:
    192 bits of SHA-256 (32 URL-safe characters, fits a protocol ``token``). The
    credential itself is 256 bits of CSPRNG output, so a fast hash is enough."""
    import base64
    import hashlib

    digest = hashlib.sha256(b"hearth-owner-credential-v1\x00" + credential.encode()).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode()


def validate_values(
    values: Mapping[str, object], specs: Mapping[str, ReadingSpec], *, what: str = "reading"
) -> None:
    """Check names, types and physical ranges of readings or command parameters."""
    if len(values) > MAX_READINGS:
        raise ValidationError(Reason.TOO_MANY_READINGS, f"at most {MAX_READINGS} {what}s")
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None:
            raise ValidationError(Reason.UNKNOWN_READING, f"unknown {what} {name!r}")
        spec.check(name, value)


# --- message schemas ----------------------------------------------------------------------
Name = Annotated[str, Field(pattern=_NAME)]
DeviceId = Annotated[str, Field(pattern=_DEVICE_ID)]
Value = Annotated[
    bool | float | Annotated[str, Field(max_length=32)], Field(union_mode="left_to_right")
]
Values = Annotated[dict[Name, Value], Field(max_length=MAX_READINGS)]


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class Telemetry(_Message):
    v: Literal[1] = 1
    device_id: DeviceId
    seq: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    ts: dt.datetime
    readings: Values


class Event(_Message):
    v: Literal[1] = 1
    device_id: DeviceId
    seq: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    ts: dt.datetime
    kind: Name
    detail: Annotated[str, Field(max_length=256)] = ""


class Command(_Message):
    v: Literal[1] = 1
    command_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    device_id: DeviceId
    name: Name
    params: Values = Field(default_factory=dict)
    issued_at: dt.datetime
    expires_at: dt.datetime


class CommandResult(_Message):
    v: Literal[1] = 1
    command_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    device_id: DeviceId
    seq: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    ts: dt.datetime
    status: Literal["succeeded", "rejected", "failed"]
    reason: Annotated[str, Field(max_length=64)] = ""
    detail: Annotated[str, Field(max_length=256)] = ""
    state: Values = Field(default_factory=dict)


_M = TypeVar("_M", bound=_Message)


def new_command_id() -> str:
    return secrets.token_hex(16)


def _decode(cls: type[_M], raw: bytes) -> _M:
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise ValidationError(
            Reason.PAYLOAD_TOO_LARGE, f"{len(raw)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )
    try:  # the validator itself: model_validate_json only wraps it (0.3 µs a message)
        return cls.__pydantic_validator__.validate_json(raw)  # type: ignore[no-any-return]
    except pydantic.ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "message"
        kind = first["type"]
        if kind == "json_invalid" or kind == "json_type":
            raise ValidationError(Reason.MALFORMED_JSON, "payload is not valid JSON") from None
        if kind == "extra_forbidden":
            raise ValidationError(Reason.UNKNOWN_FIELD, f"unknown field {loc!r}") from None
        if kind in ("too_long",) and loc in ("readings", "params", "state"):
            raise ValidationError(
                Reason.TOO_MANY_READINGS, f"at most {MAX_READINGS} entries in {loc}"
            ) from None
        raise ValidationError(Reason.INVALID_SCHEMA, f"{loc}: {first['msg']}") from None


def _check_ts(ts: dt.datetime, now: dt.datetime | None) -> dt.datetime:
    """Refuse a timestamp without an offset or out of range; return it in UTC."""
    if ts.tzinfo is None:
        raise ValidationError(Reason.INVALID_SCHEMA, "timestamps must carry a UTC offset")
    now = now or dt.datetime.now(dt.UTC)
    # in UTC first: comparing datetimes of different tzinfo objects asks both for their
    # offset on every comparison (the parser's tzinfo answers through a method call)
    if ts.tzinfo is not dt.UTC:
        ts = ts.astimezone(dt.UTC)
    if ts < EARLIEST_TIMESTAMP or ts > now + MAX_FUTURE_SKEW:
        raise ValidationError(Reason.TIMESTAMP_OUT_OF_RANGE, "timestamp is implausible")
    return ts


def _check_device(device_id: str, topic_device_id: str) -> None:
    if device_id != topic_device_id:
        raise ValidationError(Reason.DEVICE_MISMATCH, "device_id does not match the topic")


Uplink = Telemetry | Event | CommandResult
"""What a unit publishes for the service: on ``telemetry``, ``event`` and ``cmd/result``."""


def _telemetry(raw: bytes, topic_device_id: str, model: ModelSpec,
               now: dt.datetime | None) -> tuple[Telemetry, dt.datetime]:
    msg = _decode(Telemetry, raw)
    _check_device(msg.device_id, topic_device_id)
    ts = _check_ts(msg.ts, now)
    validate_values(msg.readings, model.readings)
    return msg, ts


def _event(raw: bytes, topic_device_id: str, _model: ModelSpec | None,
           now: dt.datetime | None) -> tuple[Event, dt.datetime]:
    msg = _decode(Event, raw)
    _check_device(msg.device_id, topic_device_id)
    return msg, _check_ts(msg.ts, now)


def _command_result(raw: bytes, topic_device_id: str, model: ModelSpec,
                    now: dt.datetime | None) -> tuple[CommandResult, dt.datetime]:
    msg = _decode(CommandResult, raw)
    _check_device(msg.device_id, topic_device_id)
    ts = _check_ts(msg.ts, now)
    validate_values(msg.state, model.readings)
    return msg, ts


_UPLINK_PARSERS: Mapping[str, Callable[
    [bytes, str, ModelSpec, dt.datetime | None], tuple[Uplink, dt.datetime]]] = {
    "telemetry": _telemetry, "event": _event, "cmd/result": _command_result}


def parse_uplink(kind: str, raw: bytes, *, topic_device_id: str, model: ModelSpec,
                 now: dt.datetime | None = None) -> tuple[Uplink, dt.datetime]:
    """A message a unit published on its ``kind`` topic, checked as
    :func:`parse_telemetry`, :func:`parse_event` or :func:`parse_command_result` check
    it, with its ``ts`` in UTC (what the ingest stores). Any other kind is refused as
    ``unknown_topic``: units do not publish there."""
    parse = _UPLINK_PARSERS.get(kind)
    if parse is None:
        raise ValidationError(Reason.UNKNOWN_TOPIC, "units do not publish on this topic")
    return parse(raw, topic_device_id, model, now)


def parse_telemetry(
    raw: bytes, *, topic_device_id: str, model: ModelSpec, now: dt.datetime | None = None
) -> Telemetry:
    return _telemetry(raw, topic_device_id, model, now)[0]


def parse_event(raw: bytes, *, topic_device_id: str, now: dt.datetime | None = None) -> Event:
    return _event(raw, topic_device_id, None, now)[0]


def parse_command_result(
    raw: bytes, *, topic_device_id: str, model: ModelSpec, now: dt.datetime | None = None
) -> CommandResult:
    return _command_result(raw, topic_device_id, model, now)[0]


def parse_command(
    raw: bytes, *, device_id: str, model: ModelSpec, now: dt.datetime | None = None
) -> Command:
    """What a unit runs on every command it receives, before acting on it."""
    msg = _decode(Command, raw)
    _check_device(msg.device_id, device_id)
    now = now or dt.datetime.now(dt.UTC)
    if msg.expires_at.tzinfo is None or msg.issued_at.tzinfo is None:
        raise ValidationError(Reason.INVALID_SCHEMA, "timestamps must carry a UTC offset")
    if msg.expires_at <= now:
        raise ValidationError(Reason.EXPIRED, "command has expired")
    spec = command_spec(model, msg.name)
    if spec is None:
        raise ValidationError(Reason.UNKNOWN_COMMAND, f"{model.name} has no command {msg.name!r}")
    validate_values(msg.params, spec.params, what="parameter")
    missing = set(spec.params) - set(msg.params)
    if missing:
        raise ValidationError(Reason.INVALID_SCHEMA, f"missing parameter {sorted(missing)[0]!r}")
    return msg


# --- update channel (signed updates, issue 4) -----------------------------------------------
Version = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){2}$")]
RequestId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
TargetName = Annotated[str, Field(max_length=128, pattern=r"^[a-z][a-z0-9_]{0,31}/[a-z0-9_.-]+$")]


class UpdateCheck(_Message):
    """Unit -> cloud on ``update/check``: "give me an update token (and my release)".

    ``version`` is the committed (known-good) version, ``running`` the one running now and
    ``mode`` what the unit's boot decided (``trial``: a new version awaits its health check).
    """

    v: Literal[1] = 1
    device_id: DeviceId
    request_id: RequestId
    ts: dt.datetime
    version: Version
    running: Version | None = None
    mode: Literal["normal", "trial", "quarantined", "safe_mode"] = "normal"


class UpdateOffer(_Message):
    """Cloud -> unit on ``update/offer``, answering one :class:`UpdateCheck`.

    ``token`` is a short-lived bearer token for the update routes (scope ``updates:read``,
    this unit only). ``target`` is the release the unit should install *now* (its rollout
    cohort includes it and its owner's update preference allows it), ``available`` the
    newest release for it even if not now. ``support_*`` is its model's support period.
    An empty ``token`` with a ``refused`` reason means no download is allowed.
    """

    v: Literal[1] = 1
    device_id: DeviceId
    request_id: RequestId
    ts: dt.datetime
    token: Annotated[str, Field(max_length=1024)] = ""
    token_expires_at: dt.datetime | None = None
    target: TargetName | None = None
    available: Version | None = None
    support_end: dt.date | None = None
    support_status: Literal["supported", "ending_soon", "ended", "undefined"] = "undefined"
    refused: Annotated[str, Field(max_length=64)] = ""


def update_topic(device_id: str, kind: Literal["update/check", "update/offer"]) -> str:
    """The update channel topics of a unit."""
    return device_topic(device_id, kind)


def parse_update_check(
    raw: bytes, *, topic_device_id: str, now: dt.datetime | None = None
) -> UpdateCheck:
    """What the service runs on every update check (size, schema, device id, timestamp)."""
    msg = _decode(UpdateCheck, raw)
    _check_device(msg.device_id, topic_device_id)
    _check_ts(msg.ts, now)
    return msg


def parse_update_offer(raw: bytes, *, device_id: str) -> UpdateOffer:
    """What a unit runs on every offer (the caller matches the request id)."""
    msg = _decode(UpdateOffer, raw)
    _check_device(msg.device_id, device_id)
    return msg


def encode(msg: BaseModel) -> bytes:
    """Canonical wire form of a message."""
    return msg.model_dump_json().encode()


def to_wire(obj: Mapping[str, Any]) -> bytes:
    """Encode a plain mapping (used by tests and tools that craft raw payloads)."""
    import json

    return json.dumps(obj, separators=(",", ":")).encode()
