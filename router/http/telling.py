"""What the handoff desk says to the world, and where it goes: its alerts (MQTT, the dashboard,
escalations into the audit chain) and each step a handoff's sender is told of (in-process
listeners such as the dashboard and the demo, MQTT `handoffs/{from}/status`, the sender's
`notify_url`; what people answered into the audit chain)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from router.infra.audit import AuditLog
from router.infra.mqtt_link import MqttLink
from router.watch.alerts import Alerter

ANSWERS = frozenset({"acknowledged", "rejected", "offered", "completed"})  # people's words

Listener = Callable[[dict[str, Any]], None]


class Telling:
    """`alert` and `tell_sender` are the desk's `alert` and `notify` callbacks."""

    def __init__(self, *, audit: AuditLog, mqtt: MqttLink | None, alerter: Alerter,
                 on_alert: Listener, on_step: Listener) -> None:
        self.audit = audit
        self.mqtt = mqtt
        self.alerter = alerter
        self.on_alert = on_alert
        self.status_listeners: list[Listener] = [on_step]

    def alert(self, alert: dict[str, Any]) -> None:
        """The handoff desk's alerts: on MQTT, and escalations into the audit chain too."""
        if alert.get("kind") == "handoff_escalated":
            what = ("not delivered" if alert.get("waiting_for") != "acknowledgement"
                    else "not answered by a dispatcher")
            self.audit.event("escalation", force=alert.get("to"), source="handoff desk",
                             reason=f"{alert.get('priority')} handoff {alert.get('handoff_id')} "
                                    f"{what} within {alert.get('deadline_s')} s",
                             alert=alert)
        if self.mqtt is not None:
            self.mqtt.publish("alerts", alert)
        self.on_alert(alert)

    def tell_sender(self, message: dict[str, Any]) -> None:
        """A handoff's step, to its sender: MQTT `handoffs/{from}/status` (QoS 1) and its
        `notify_url`; what people answered goes into the audit chain."""
        sender = str(message.get("from"))
        for listener in self.status_listeners:
            listener(message)
        if self.mqtt is not None:
            self.mqtt.publish(f"handoffs/{sender}/status", message, qos=1)
        self.alerter.post(sender, message)
        status = message.get("status")
        if status in ANSWERS or status == "on_paper":  # what people said (a manager: on paper)
            paper = status == "on_paper"
            self.audit.event("paper" if paper else "answer", force=message.get("to"),
                             source=f"manager:{message.get('by')}" if paper
                             else f"partner:{message.get('to')}",
                             reason=str(message.get("note" if paper else "detail", status)),
                             handoff_id=message.get("handoff_id"), status=status,
                             by=message.get("by"))
