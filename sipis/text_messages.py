"""SIP MESSAGE for a sleeping app: accept, filter, push ``NotifyTextMessage`` (Acrobits' rules).

* bodies over ``max_body`` bytes (4 MiB) → ``413``;
* ``application/im-iscomposing+xml`` (typing indicators) → ``200``, dropped;
* a Content-Type with ``;imdn`` (delivery receipts) → ``200``, no push;
* anything else → ``200`` and a text push to the instance.

Unknown instance → ``404`` (statelessly, by :class:`~sipis.inbound.InboundGate`); an instance this
node may not act for (off, disabled) → ``480``. We answer at once: the sender's Timer F must never
run out while we push.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from contract.events import MessageReceived
from sipis.clock import Clock
from sipis.events import EventBus
from sipis.inbound import instance_for
from sipis.lifecycle import InstanceLifecycle
from sipis.push.base import PushKind
from sipis.push.delivery import PushDelivery
from sipis.sip.endpoint import IncomingRequest
from sipis.sip.message import SipParseError

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
#: The push carries only a preview of the text; the app fetches the rest.
PREVIEW_CHARS = 120
#: Text pushes may be retried for this long.
TEXT_PUSH_WINDOW = 60.0


class TextMessages:
    def __init__(self, *, lifecycle: InstanceLifecycle, delivery: PushDelivery, bus: EventBus, clock: Clock,
                 max_body: int = MAX_BODY) -> None:
        self.lifecycle = lifecycle
        self.delivery = delivery
        self.bus = bus
        self.clock = clock
        self.max_body = max_body
        self._tasks: set[asyncio.Task[Any]] = set()

    def on_message(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        instance = instance_for(self.lifecycle, request)
        if instance is None:
            incoming.respond(404)
            return
        if not self.lifecycle.may_act(instance):
            incoming.respond(480)
            return
        if len(request.body) > self.max_body:
            incoming.respond(413, headers=[("X-Sipis-Reason", f"Body-Over-{self.max_body}-Bytes")])
            return
        content_type = (request.headers.get("Content-Type") or "text/plain").lower()
        incoming.respond(200)
        if content_type.startswith("application/im-iscomposing+xml"):
            return
        if ";imdn" in content_type.replace(" ", "") or "imdn" in content_type.split(";")[0]:
            self.bus.publish(instance.selector, MessageReceived(False, content_type))
            return
        try:
            caller = str(request.from_.uri)
        except SipParseError:
            caller = None
        preview = request.body[: PREVIEW_CHARS * 4].decode("utf-8", "replace")[:PREVIEW_CHARS]
        trace = self.delivery.new_trace(instance, PushKind.TEXT, call_id=request.call_id, caller=caller,
                                        message=preview if content_type.startswith("text/") else None)
        self.bus.publish(instance.selector, MessageReceived(True, content_type, push_id=trace.push_id,
                                                            bytes=len(request.body)))
        task = asyncio.ensure_future(
            self.delivery.deliver(instance, trace, deadline=self.clock.monotonic() + TEXT_PUSH_WINDOW))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
