"""Sending commands to units and tracking them to a result.

Life of a command::

    send() --validate--> row 'pending' (committed) --publish QoS 1--> 'sent'
        --unit's cmd/result (ingest)--> 'succeeded' | 'rejected' | 'failed'
        --no result by expires_at--> 'expired'      (a late result still wins: it is the truth)

A command is checked against the unit's model (:class:`hearth.protocol.CommandSpec`: name,
parameter names, types and physical ranges) *before* anything is stored or published, and
refused with the protocol's reason code. The row is committed before publishing so that a
fast result, arriving through ingest on another connection, always finds it. The unit
checks everything again (:func:`hearth.protocol.parse_command`); this is for a clear error
to the operator, not the only line of defence.

Publishing sits behind the small :class:`CommandPublisher` protocol: the real one is
:class:`MqttCommandPublisher` (the ``hearth-control`` broker identity), tests use
:class:`InMemoryCommandPublisher`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pydantic
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.errors import BrokerError, HearthError, NotFoundError, ValidationError
from hearth.protocol import Reason
from hearth.service.db import begin_write, utcnow
from hearth.service.fleet import get_unit
from hearth.service.models import OPEN_COMMAND_STATUSES, CommandRow, CommandStatus, UnitStatus

if TYPE_CHECKING:
    from paho.mqtt.client import Client

    from hearth.service.mqtt import MqttIdentity

__all__ = [
    "CommandPublisher",
    "CommandService",
    "InMemoryCommandPublisher",
    "MqttCommandPublisher",
]

log = logging.getLogger(__name__)

_COMMAND_ID_LEN = 32
MIN_TTL = dt.timedelta(seconds=1)


class CommandPublisher(Protocol):
    """Delivers a command to its unit. Raises :class:`HearthError` if it could not."""

    def publish(self, command: protocol.Command) -> None: ...


class InMemoryCommandPublisher:
    """Keeps published commands in a list (for tests of the API and services)."""

    def __init__(self) -> None:
        self.published: list[protocol.Command] = []
        self.fail: bool = False

    def publish(self, command: protocol.Command) -> None:
        if self.fail:
            raise BrokerError("publisher is failing on purpose")
        self.published.append(command)


class MqttCommandPublisher:
    """Publishes commands at QoS 1 with the ``hearth-control`` identity.

    :meth:`publish` waits until the broker acknowledged the message (PUBACK) or ``timeout``
    passed, so a 202 from the API means the broker has the command.
    """

    def __init__(self, identity: MqttIdentity, *, timeout: float = 5.0) -> None:
        self._identity = identity
        self._timeout = timeout
        self._client: Client | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        from hearth.service.mqtt import make_client

        with self._lock:
            if self._client is not None:
                return
            client = make_client(self._identity)
            try:
                client.connect(self._identity.host, self._identity.port)
            except (OSError, ValueError) as e:
                raise BrokerError(f"cannot connect to the broker: {type(e).__name__}") from e
            client.loop_start()
            self._client = client

    def stop(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def publish(self, command: protocol.Command) -> None:
        client = self._client
        if client is None:
            raise BrokerError("command publisher is not started")
        try:
            info = client.publish(
                protocol.command_topic(command.device_id), protocol.encode(command), qos=1
            )
            info.wait_for_publish(timeout=self._timeout)
        except (RuntimeError, ValueError, OSError) as e:
            raise BrokerError(f"command not published: {type(e).__name__}") from e
        if not info.is_published():
            raise BrokerError("broker did not acknowledge the command in time")


def _command_json(row: CommandRow, now: dt.datetime) -> dict[str, Any]:
    status, completed_at = row.status, row.completed_at
    if status in OPEN_COMMAND_STATUSES and row.expires_at <= now:
        status, completed_at = CommandStatus.EXPIRED.value, row.expires_at
    return {
        "command_id": row.command_id,
        "device_id": row.device_id,
        "name": row.name,
        "params": row.params,
        "issued_at": row.issued_at,
        "expires_at": row.expires_at,
        "status": status,
        "result": row.result,
        "completed_at": completed_at,
    }


class CommandService:
    """Validates, stores, publishes and expires commands."""

    def __init__(
        self,
        publisher: CommandPublisher,
        *,
        default_ttl: dt.timedelta = protocol.COMMAND_TTL,
        max_ttl: dt.timedelta = dt.timedelta(hours=1),
    ) -> None:
        if not MIN_TTL <= default_ttl <= max_ttl:
            raise ValueError("default_ttl must be between 1 s and max_ttl")
        self._publisher = publisher
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl

    def validate(
        self, model_name: str, name: str, params: Mapping[str, object], *, system: bool = False
    ) -> None:
        """Check a command against the model. Raises :class:`ValidationError`.

        ``system`` also allows :data:`hearth.protocol.SYSTEM_COMMANDS` (owner binding, reset),
        which only the service itself sends (never the operator or consumer command routes).
        """
        model = protocol.MODELS.get(model_name)
        if model is None:  # pragma: no cover - units are imported with known models
            raise ValidationError(Reason.UNKNOWN_COMMAND, f"unknown model {model_name!r}")
        if not isinstance(name, str):
            raise ValidationError(Reason.WRONG_TYPE, "command name must be a string")
        spec = protocol.command_spec(model, name) if system else model.commands.get(name)
        if spec is None:
            raise ValidationError(
                Reason.UNKNOWN_COMMAND,
                f"{model.name} has no command {name[:32]!r}; "
                f"known: {', '.join(sorted(model.commands))}",
            )
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise ValidationError(Reason.WRONG_TYPE, "params must be an object")
        protocol.validate_values(params, spec.params, what="parameter")
        missing = sorted(set(spec.params) - set(params))
        if missing:
            raise ValidationError(Reason.INVALID_SCHEMA, f"missing parameter {missing[0]!r}")

    def send(
        self,
        session_factory: sessionmaker[Session],
        device_id: str,
        name: str,
        params: Mapping[str, object],
        ttl: dt.timedelta | None = None,
        *,
        now: dt.datetime | None = None,
        system: bool = False,
    ) -> str:
        """Validate, store and publish a command; returns its id.

        Runs its own short transactions (the row must be committed before publishing).
        Raises :class:`NotFoundError` (unknown unit), :class:`ValidationError` (reason
        ``unknown_command``, ``unknown_reading``, ``wrong_type``, ``out_of_range``,
        ``invalid_schema``, ``revoked``), :class:`BrokerError` (not delivered to the broker;
        the command is then recorded as failed).
        """
        ttl = self.default_ttl if ttl is None else ttl
        if not MIN_TTL <= ttl <= self.max_ttl:
            raise ValidationError(
                Reason.OUT_OF_RANGE,
                f"ttl must be {int(MIN_TTL.total_seconds())}.."
                f"{int(self.max_ttl.total_seconds())} seconds",
            )
        now = now or utcnow()
        with session_factory.begin() as session:
            begin_write(session)
            unit = get_unit(session, device_id)
            if unit.status != UnitStatus.ACTIVE:
                raise ValidationError(Reason.REVOKED, "unit is revoked")
            self.validate(unit.model, name, params, system=system)
            try:
                command = protocol.Command(
                    command_id=protocol.new_command_id(),
                    device_id=device_id,
                    name=name,
                    params=dict(params),  # type: ignore[arg-type]  # checked just above
                    issued_at=now,
                    expires_at=now + ttl,
                )
            except pydantic.ValidationError as e:
                first = e.errors(include_url=False, include_input=False)[0]
                raise ValidationError(Reason.INVALID_SCHEMA, str(first["msg"])[:200]) from None
            session.add(
                CommandRow(
                    command_id=command.command_id,
                    device_id=device_id,
                    name=name,
                    params=dict(command.params),
                    issued_at=command.issued_at,
                    expires_at=command.expires_at,
                    status=CommandStatus.PENDING.value,
                    result=None,
                    completed_at=None,
                )
            )
        try:
            self._publisher.publish(command)
        except HearthError as e:
            self._finish(session_factory, command.command_id, CommandStatus.FAILED,
                         {"source": "service", "status": "failed", "reason": "not_published",
                          "detail": str(e)[:200]})
            raise BrokerError("the broker did not take the command") from e
        with session_factory.begin() as session:
            begin_write(session)
            session.execute(
                sa.update(CommandRow)
                .where(CommandRow.command_id == command.command_id,
                       CommandRow.status == CommandStatus.PENDING.value)
                .values(status=CommandStatus.SENT.value)
            )
        return command.command_id

    @staticmethod
    def _finish(
        session_factory: sessionmaker[Session],
        command_id: str,
        status: CommandStatus,
        result: dict[str, Any],
    ) -> None:
        try:
            with session_factory.begin() as session:
                begin_write(session)
                session.execute(
                    sa.update(CommandRow)
                    .where(CommandRow.command_id == command_id,
                           CommandRow.status.in_(OPEN_COMMAND_STATUSES))
                    .values(status=status.value, result=result, completed_at=utcnow())
                )
        except sa.exc.SQLAlchemyError:  # the expiry sweep will close it later
            log.exception("could not record command %s as %s", command_id, status.value)

    @staticmethod
    def get(session: Session, command_id: str) -> CommandRow:
        """The command row. Raises :class:`NotFoundError`."""
        if not isinstance(command_id, str) or len(command_id) != _COMMAND_ID_LEN:
            raise NotFoundError("no such command")
        row = session.get(CommandRow, command_id)
        if row is None:
            raise NotFoundError("no such command")
        return row

    @staticmethod
    def expire_due(session: Session, *, now: dt.datetime | None = None) -> int:
        """Mark every open command past its expiry as expired; returns how many."""
        now = now or utcnow()
        result = session.execute(
            sa.update(CommandRow)
            .where(CommandRow.status.in_(OPEN_COMMAND_STATUSES), CommandRow.expires_at <= now)
            .values(status=CommandStatus.EXPIRED.value, completed_at=now)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    def as_json(row: CommandRow, *, now: dt.datetime | None = None) -> dict[str, Any]:
        """The command as the API shows it; an open command past its expiry reads as
        ``expired`` even before :meth:`expire_due` has recorded it."""
        return _command_json(row, now or utcnow())
