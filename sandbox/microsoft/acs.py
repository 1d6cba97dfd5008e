"""Azure Communication Services SMS: send, repeatability, rate limit, opt-out, Event Grid."""

from __future__ import annotations

import html
import json
import math
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from sandbox.microsoft import hmac_auth
from sandbox.microsoft.clock import graph_time
from sandbox.microsoft.core import Sandbox

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
GSM7 = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€"
)
STOP_WORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT"}
START_WORDS = {"START", "UNSTOP", "YES", "OPTIN"}
ACS_TOPIC = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/sandbox/providers/"
    "Microsoft.Communication/communicationServices/ehr-video-visit-sandbox"
)


def segments(message: str) -> int:
    """SMS segments: 160/153 GSM-7 characters, or 70/67 UCS-2 characters."""
    gsm = all(c in GSM7 for c in message)
    single, multi = (160, 153) if gsm else (70, 67)
    n = len(message)
    return 1 if n <= single else math.ceil(n / multi)


@dataclass
class SmsMessage:
    message_id: str
    sender: str
    to: str
    message: str
    tag: str | None
    sent_at: datetime
    segments: int
    delivery_report: bool
    repeatability_request_id: str | None
    direction: str = "outbound"
    delivery_status: str = "Queued"

    def public(self) -> dict[str, Any]:
        return {
            "messageId": self.message_id,
            "direction": self.direction,
            "from": self.sender,
            "to": self.to,
            "message": self.message,
            "tag": self.tag,
            "sentDateTime": graph_time(self.sent_at),
            "segments": self.segments,
            "enableDeliveryReport": self.delivery_report,
            "repeatabilityRequestId": self.repeatability_request_id,
            "deliveryStatus": self.delivery_status,
        }


@dataclass
class AcsState:
    owned_numbers: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: list[SmsMessage] = field(default_factory=list)
    repeatability: dict[str, SmsMessage] = field(default_factory=dict)
    sent_window: dict[str, deque[datetime]] = field(default_factory=dict)
    opted_out: set[tuple[str, str]] = field(default_factory=set)  # (recipient, sender)
    webhook_url: str | None = None
    delivery_failures: dict[str, str] = field(default_factory=dict)
    # Status codes the next send requests answer with, for testing retries (e.g. 500, 503).
    send_failures: deque[int] = field(default_factory=deque)


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


class Acs:
    """Handlers of the SMS API plus the sandbox inbox and admin endpoints."""

    def __init__(self, sb: Sandbox, state: AcsState) -> None:
        self.sb = sb
        self.state = state

    async def authenticate(self, request: web.Request) -> bytes | web.Response:
        """Read the body and verify HMAC; returns the body or a 401 response."""
        body = await request.read()
        try:
            hmac_auth.verify(
                request,
                body,
                self.sb.config.acs_access_key,
                self.sb.clock.now(),
                self.sb.config.acs_max_clock_skew_s,
            )
        except hmac_auth.HmacError as exc:
            return hmac_auth.denied(str(exc))
        return body

    # -- send ---------------------------------------------------------------------------------
    async def send(self, request: web.Request) -> web.Response:
        body = await self.authenticate(request)
        if isinstance(body, web.Response):
            return body
        if request.query.get("api-version") is None:
            return error(400, "MissingApiVersionParameter", "The api-version is required.")
        if self.state.send_failures:
            status = self.state.send_failures.popleft()
            return error(status, "ServiceUnavailable", "The service is temporarily unavailable.")
        try:
            req = json.loads(body)
        except ValueError:
            return error(400, "BadRequest", "Request body is not valid JSON.")
        sender = str(req.get("from") or "")
        recipients = req.get("smsRecipients") or []
        message = req.get("message")
        options = req.get("smsSendOptions") or {}
        if not isinstance(message, str) or not message:
            return error(400, "BadRequest", "message is required.")
        if len(message) > 2048:
            return error(400, "BadRequest", "message exceeds 2048 characters.")
        if not isinstance(recipients, list) or not 1 <= len(recipients) <= 100:
            return error(400, "BadRequest", "smsRecipients must hold 1 to 100 recipients.")
        if sender not in self.state.owned_numbers:
            return error(
                400,
                "InvalidFromNumber",
                f"The 'from' number {sender} is not a number owned by this resource.",
            )
        for r in recipients:
            if r.get("repeatabilityRequestId") and not r.get("repeatabilityFirstSent"):
                return error(
                    400,
                    "BadRequest",
                    "repeatabilityFirstSent is required with repeatabilityRequestId.",
                )
        now = self.sb.clock.now()
        fresh = [
            r for r in recipients if r.get("repeatabilityRequestId") not in self.state.repeatability
        ]
        window = self.state.sent_window.setdefault(sender, deque())
        while window and window[0] <= now - timedelta(minutes=1):
            window.popleft()
        limit = self.sb.config.sms_rate_per_minute
        if len(window) + len(fresh) > limit:
            retry = (
                max(1, math.ceil((window[0] + timedelta(minutes=1) - now).total_seconds()))
                if window
                else 60
            )
            return error(
                429,
                "TooManyRequests",
                f"Rate limit of {limit} messages per minute for {sender} exceeded.",
                {"Retry-After": str(retry)},
            )
        value = [self._send_one(sender, r, message, options, now, window) for r in recipients]
        return web.json_response({"value": value}, status=202)

    def _send_one(self, sender: str, r: dict[str, Any], message: str, options: dict[str, Any],
                  now: datetime, window: deque[datetime]) -> dict[str, Any]:  # fmt: skip
        to = str(r.get("to") or "")
        rid = r.get("repeatabilityRequestId")
        if rid and rid in self.state.repeatability:
            prior = self.state.repeatability[rid]
            return {
                "to": to,
                "messageId": prior.message_id,
                "httpStatusCode": 202,
                "repeatabilityResult": "rejected",
                "successful": True,
                "errorMessage": None,
            }
        repeat = "accepted" if rid else None
        if not E164.match(to):
            return self._failed(to, 400, f"Invalid To phone number format: {to}.", repeat)
        if (to, sender) in self.state.opted_out:
            return self._failed(
                to, 400, "The recipient has opted out of messages from this number (STOP).", repeat
            )
        msg = SmsMessage(
            message_id=f"Outgoing_{now:%Y%m%d%H%M%S}{uuid.uuid4()}_noam",
            sender=sender,
            to=to,
            message=message,
            tag=options.get("tag"),
            sent_at=now,
            segments=segments(message),
            delivery_report=bool(options.get("enableDeliveryReport")),
            repeatability_request_id=rid,
        )
        self.state.messages.append(msg)
        window.append(now)
        if rid:
            self.state.repeatability[rid] = msg
        self._deliver(msg)
        return {
            "to": to,
            "messageId": msg.message_id,
            "httpStatusCode": 202,
            "repeatabilityResult": repeat,
            "successful": True,
            "errorMessage": None,
        }

    @staticmethod
    def _failed(to: str, status: int, message: str, repeat: str | None) -> dict[str, Any]:
        return {
            "to": to,
            "messageId": None,
            "httpStatusCode": status,
            "repeatabilityResult": repeat,
            "successful": False,
            "errorMessage": message,
        }

    # -- Event Grid ---------------------------------------------------------------------------
    def _event(self, event_type: str, subject: str, data: dict[str, Any]) -> dict[str, Any]:
        now = self.sb.clock.now()
        return {
            "id": str(uuid.uuid4()),
            "topic": ACS_TOPIC,
            "subject": subject,
            "data": data,
            "eventType": event_type,
            "dataVersion": "1.0",
            "metadataVersion": "1",
            "eventTime": graph_time(now),
        }

    def _publish(self, event: dict[str, Any]) -> None:
        url = self.state.webhook_url
        if not url:
            return
        headers = {
            "aeg-event-type": "Notification",
            "aeg-subscription-name": "SANDBOX-SMS",
            "aeg-data-version": "1.0",
            "aeg-metadata-version": "1",
        }
        self.sb.notifier.enqueue("eventgrid:sms", url, [event], headers)

    def _deliver(self, msg: SmsMessage) -> None:
        status = self.state.delivery_failures.get(msg.to, "Delivered")
        msg.delivery_status = status
        if not msg.delivery_report:
            return
        now = self.sb.clock.now()
        ok = status == "Delivered"
        data = {
            "MessageId": msg.message_id,
            "From": msg.sender,
            "To": msg.to,
            "DeliveryStatus": status,
            "DeliveryStatusDetails": "No error." if ok else "Carrier rejected the message.",
            "DeliveryAttempts": [
                {
                    "Timestamp": graph_time(now),
                    "SegmentsSucceeded": msg.segments if ok else 0,
                    "SegmentsFailed": 0 if ok else msg.segments,
                }
            ],
            "ReceivedTimestamp": graph_time(now),
            "Tag": msg.tag,
        }
        self._publish(
            self._event(
                "Microsoft.Communication.SMSDeliveryReportReceived",
                f"/phonenumber/{msg.sender.lstrip('+')}",
                data,
            )
        )

    def receive(self, sender: str, to: str, text: str) -> SmsMessage:
        """A handset replies: record it, apply STOP/START, publish SMSReceived."""
        now = self.sb.clock.now()
        msg = SmsMessage(
            message_id=f"Incoming_{now:%Y%m%d%H%M%S}{uuid.uuid4()}_noam",
            sender=sender,
            to=to,
            message=text,
            tag=None,
            sent_at=now,
            segments=segments(text),
            delivery_report=False,
            repeatability_request_id=None,
            direction="inbound",
            delivery_status="Received",
        )
        self.state.messages.append(msg)
        word = text.strip().upper()
        if word in STOP_WORDS:
            self.state.opted_out.add((sender, to))
        elif word in START_WORDS:
            self.state.opted_out.discard((sender, to))
        data = {
            "MessageId": msg.message_id,
            "From": sender,
            "To": to,
            "Message": text,
            "ReceivedTimestamp": graph_time(now),
        }
        self._publish(
            self._event(
                "Microsoft.Communication.SMSReceived", f"/phonenumber/{to.lstrip('+')}", data
            )
        )
        return msg

    # -- sandbox admin and inbox --------------------------------------------------------------
    async def admin_messages(self, request: web.Request) -> web.Response:
        to = request.query.get("to")
        items = [m.public() for m in self.state.messages if to is None or m.to == to]
        return web.json_response({"value": items})

    async def admin_reply(self, request: web.Request) -> web.Response:
        body = await request.json()
        sender, to, text = str(body.get("from")), str(body.get("to")), str(body.get("message"))
        if to not in self.state.owned_numbers:
            return error(400, "BadRequest", f"{to} is not a number of this resource.")
        return web.json_response(self.receive(sender, to, text).public(), status=201)

    async def admin_webhook(self, request: web.Request) -> web.Response:
        if request.method == "PUT":
            body = await request.json()
            self.state.webhook_url = body.get("url") or None
        return web.json_response({"url": self.state.webhook_url})

    async def admin_delivery_failure(self, request: web.Request) -> web.Response:
        body = await request.json()
        to = str(body["to"])
        status = body.get("status")
        if status:
            self.state.delivery_failures[to] = str(status)
        else:
            self.state.delivery_failures.pop(to, None)
        return web.json_response({"to": to, "status": status})

    async def admin_send_failures(self, request: web.Request) -> web.Response:
        """Makes the next `count` sends answer `status` (a provider outage, for tests)."""
        body = await request.json()
        status, count = int(body.get("status", 503)), int(body.get("count", 1))
        if not 500 <= status <= 599 or not 0 <= count <= 100:
            return error(400, "BadRequest", "status must be 5xx and count 0..100.")
        self.state.send_failures.extend([status] * count)
        return web.json_response({"pending_failures": len(self.state.send_failures)})

    async def admin_opt_outs(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"value": [{"recipient": r, "sender": s} for r, s in sorted(self.state.opted_out)]}
        )

    async def inbox(self, request: web.Request) -> web.Response:
        number = request.match_info["e164"].replace(" ", "+")
        if not number.startswith("+"):
            number = "+" + number
        rows = []
        for m in reversed(self.state.messages):
            if number not in (m.to, m.sender):
                continue
            who = f"from {m.sender}" if m.to == number else f"to {m.to} (your reply)"
            rows.append(
                f"<li><small>{graph_time(m.sent_at)} {html.escape(who)}</small><br>"
                f"{self._linkify(m.message)}</li>"
            )
        senders = sorted({m.sender for m in self.state.messages if m.to == number})
        options = "".join(f"<option>{html.escape(s)}</option>" for s in senders)
        page = (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='refresh' content='3'><title>SMS {html.escape(number)}</title>"
            "<style>body{font-family:sans-serif;max-width:30em;margin:2em auto}"
            "li{margin:.8em 0;list-style:none;background:#eef;padding:.6em;border-radius:.6em}"
            "</style></head><body>"
            f"<h1>&#128241; {html.escape(number)}</h1>"
            f"<form method='post' action='/_sandbox/sms/inbox/{html.escape(number)}/reply'>"
            f"Reply to <select name='to'>{options}</select> "
            "<input name='message' value='STOP' size='8'><button>Send</button></form>"
            f"<ul>{''.join(rows) or '<p>No messages yet.</p>'}</ul></body></html>"
        )
        return web.Response(text=page, content_type="text/html")

    @staticmethod
    def _linkify(text: str) -> str:
        out = html.escape(text)
        return re.sub(r"(https://[^\s<]+)", r"<a href='\1'>\1</a>", out)

    async def inbox_reply(self, request: web.Request) -> web.Response:
        number = request.match_info["e164"].replace(" ", "+")
        form = await request.post()
        to = str(form.get("to", ""))
        if to in self.state.owned_numbers:
            self.receive(number, to, str(form.get("message", "")))
        raise web.HTTPSeeOther(f"/_sandbox/sms/inbox/{number}")

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/sms", self.send)
        router.add_get("/_sandbox/sms/messages", self.admin_messages)
        router.add_post("/_sandbox/sms/reply", self.admin_reply)
        router.add_get("/_sandbox/sms/opt-outs", self.admin_opt_outs)
        router.add_route("GET", "/_sandbox/acs/webhook", self.admin_webhook)
        router.add_route("PUT", "/_sandbox/acs/webhook", self.admin_webhook)
        router.add_post("/_sandbox/sms/delivery-failure", self.admin_delivery_failure)
        router.add_post("/_sandbox/sms/send-failures", self.admin_send_failures)
        router.add_get("/_sandbox/sms/inbox/{e164}", self.inbox)
        router.add_post("/_sandbox/sms/inbox/{e164}/reply", self.inbox_reply)
