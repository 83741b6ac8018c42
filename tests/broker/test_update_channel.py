"""Least privilege on the update channel (signed updates): a unit asks only for itself and
reads only its own offers; ``hearth-updates`` only takes checks and publishes offers."""

from __future__ import annotations

from hearth.protocol import device_topic
from hearth.service.broker import CONTROL, INGEST, UPDATES
from tests.broker.conftest import PeerFactory, Unit, World
from tests.helpers import wait_until

NOT_AUTHORIZED = 135
SHARE = f"$share/{UPDATES}/hearth/v1/d/+/update/check"


def check(unit: Unit) -> str:
    return device_topic(unit.device_id, "update/check")


def offer(unit: Unit) -> str:
    return device_topic(unit.device_id, "update/offer")


def test_unit_asks_and_gets_its_own_offer_only(shared: World, connect: PeerFactory) -> None:
    a, b = shared.units[0], shared.units[1]
    service = connect(shared.broker.identity(UPDATES), client_id=f"{UPDATES}-1")
    assert not service.subscribe(SHARE)[0].is_failure
    unit_a = connect(a.identity(shared.broker))
    unit_b = connect(b.identity(shared.broker))
    assert not unit_a.subscribe(offer(a))[0].is_failure
    assert not unit_b.subscribe(offer(b))[0].is_failure
    # a unit cannot ask in another unit's name, nor read another unit's offers
    assert unit_a.publish(check(b), b"as-b").value == NOT_AUTHORIZED
    assert unit_a.subscribe(offer(b))[0].value == NOT_AUTHORIZED
    assert unit_a.subscribe("hearth/v1/d/+/update/offer")[0].value == NOT_AUTHORIZED
    assert unit_a.subscribe(SHARE)[0].value == NOT_AUTHORIZED
    assert unit_a.publish(offer(a), b"self-served").value == NOT_AUTHORIZED
    # the positive path
    assert not unit_a.publish(check(a), b"check-a").is_failure
    wait_until(lambda: service.got(b"check-a", check(a)), what="the service gets the check")
    assert not service.publish(offer(a), b"offer-a").is_failure
    assert not service.publish(offer(b), b"offer-b").is_failure
    wait_until(lambda: unit_a.got(b"offer-a") and unit_b.got(b"offer-b"),
               what="each unit gets its own offer")
    assert not service.got(b"as-b")
    assert not unit_a.got(b"offer-b") and not unit_a.got(b"self-served")


def test_update_identity_is_limited_to_the_update_channel(
    shared: World, connect: PeerFactory
) -> None:
    a = shared.units[0]
    service = connect(shared.broker.identity(UPDATES), client_id=f"{UPDATES}-scope")
    for topic in ("hearth/v1/d/+/telemetry", "hearth/v1/d/+/update/check", "#",
                  f"$share/{INGEST}/hearth/v1/d/+/telemetry", "hearth/v1/d/+/update/offer"):
        assert service.subscribe(topic)[0].value == NOT_AUTHORIZED, topic
    assert service.publish(device_topic(a.device_id, "cmd"), b"x").value == NOT_AUTHORIZED
    assert service.publish(check(a), b"x").value == NOT_AUTHORIZED
    # and the other service identities gained nothing on the channel
    ingest = connect(shared.broker.identity(INGEST), client_id=f"{INGEST}-scope")
    assert ingest.subscribe(SHARE)[0].value == NOT_AUTHORIZED
    assert ingest.publish(offer(a), b"x").value == NOT_AUTHORIZED
    control = connect(shared.broker.identity(CONTROL), client_id=f"{CONTROL}-scope")
    assert control.publish(offer(a), b"x").value == NOT_AUTHORIZED
    assert control.subscribe(SHARE)[0].value == NOT_AUTHORIZED
