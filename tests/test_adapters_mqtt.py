"""The MQTT adapter against a real Mosquitto: QoS 1 publish, application ack, broker loss."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from conftest import Broker, stop_task
from handoff_support import incident

from adapters import base
from adapters.base import Ack, AdapterContext, AdapterUnavailable, Delivery, Refusal
from router.handoff.incident import Incident, handoff_id

pytestmark = pytest.mark.services


def delivery(n: int) -> Delivery:
    inc = Incident.model_validate(incident(n, to="kent", frm="met")).contract_json()
    return Delivery(handoff_id(inc["from"], inc["incident_id"]), inc)


@contextlib.asynccontextmanager
async def kent_cad(broker: Broker, answer: str = "accepted") -> AsyncIterator[list[Any]]:
    """Kent's CAD side: takes handoffs from its topic and acknowledges each by key."""
    seen: list[Any] = []
    ready = asyncio.Event()

    async def run() -> None:
        async with aiomqtt.Client(broker.host, broker.port, timeout=5) as client:
            await client.subscribe("overflow/handoffs/kent", qos=1)
            ready.set()
            async for message in client.messages:
                body = json.loads(message.payload)
                seen.append(body)
                reply = {"key": body["key"], "status": answer}
                if answer == "refused":
                    reply["reason"] = "outside our area"
                await client.publish("overflow/handoffs/kent/ack", json.dumps(reply), qos=1)

    task = asyncio.create_task(run())
    async with asyncio.timeout(5):
        await ready.wait()
    try:
        yield seen
    finally:
        await stop_task(task)


def adapter(broker: Broker, ack_timeout_s: float = 2.0) -> Any:
    return base.build("mqtt", {"host": broker.host, "port": broker.port,
                               "ack_timeout_s": ack_timeout_s, "connect_timeout_s": 1},
                      AdapterContext("kent", Path("/nonexistent")))


async def test_published_with_qos1_and_acknowledged(broker: Broker) -> None:
    mqtt = adapter(broker)
    try:
        async with kent_cad(broker) as seen:
            d = delivery(1)
            outcome = await mqtt.deliver(d)
    finally:
        await mqtt.aclose()
    assert outcome == Ack(duplicate=False)
    assert seen[0]["key"] == d.key and seen[0]["incident"] == dict(d.incident)


async def test_refusal_and_missing_ack(broker: Broker) -> None:
    mqtt = adapter(broker, ack_timeout_s=0.3)
    try:
        with pytest.raises(AdapterUnavailable, match="no ack"):
            await mqtt.deliver(delivery(1))  # nobody listening on the CAD side
        async with kent_cad(broker, answer="refused"):
            refused = await mqtt.deliver(delivery(2))
    finally:
        await mqtt.aclose()
    assert refused == Refusal("outside our area")


async def test_broker_loss_is_unavailable_then_recovers(broker: Broker) -> None:
    mqtt = adapter(broker, ack_timeout_s=1.0)
    try:
        async with kent_cad(broker):
            assert isinstance(await mqtt.deliver(delivery(1)), Ack)
        broker.stop()
        with pytest.raises(AdapterUnavailable):
            await mqtt.deliver(delivery(2))
        broker.start()
        async with kent_cad(broker) as seen:
            assert isinstance(await mqtt.deliver(delivery(2)), Ack)
    finally:
        await mqtt.aclose()
    assert [m["key"] for m in seen] == [delivery(2).key]
