"""ACS phone numbers: search and purchase as long-running operations (api-version 2022-12-01)."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from sandbox.microsoft.acs import Acs, AcsState, error
from sandbox.microsoft.clock import graph_time
from sandbox.microsoft.core import Sandbox

API_VERSION = "2022-12-01"
CAPABILITY_VALUES = ("none", "inbound", "outbound", "inbound+outbound")
TOLL_FREE_PREFIXES = ("833", "844", "855", "866", "877", "888")


@dataclass
class Operation:
    id: str
    kind: str  # search | purchase
    created: str
    resource_location: str | None
    status: str = "notStarted"
    last_action: str = ""
    error: dict[str, str] | None = None

    def public(self) -> dict[str, Any]:
        return {
            "operationType": self.kind,
            "status": self.status,
            "resourceLocation": self.resource_location,
            "createdDateTime": self.created,
            "error": self.error,
            "id": self.id,
            "lastActionDateTime": self.last_action or self.created,
        }


@dataclass
class NumbersState:
    operations: dict[str, Operation] = field(default_factory=dict)
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    purchased_searches: set[str] = field(default_factory=set)
    fail_next: set[str] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def number_record(number: str, kind: str, assignment: str, caps: dict[str, str],
                  purchased: str) -> dict[str, Any]:  # fmt: skip
    return {
        "id": number.lstrip("+"),
        "phoneNumber": number,
        "countryCode": "US",
        "phoneNumberType": kind,
        "capabilities": caps,
        "assignmentType": assignment,
        "purchaseDate": purchased,
        "cost": {"amount": 2.0, "currencyCode": "USD", "billingFrequency": "monthly"},
    }


class Numbers:
    """Handlers of the phone numbers API plus failure injection."""

    def __init__(self, sb: Sandbox, acs: Acs, acs_state: AcsState) -> None:
        self.sb = sb
        self.acs = acs
        self.owned = acs_state.owned_numbers
        self.state = NumbersState()
        now = graph_time(sb.clock.now())
        for n in sb.config.owned_numbers:
            self.owned[n] = number_record(
                n, "tollFree", "application", {"sms": "inbound+outbound", "calling": "none"}, now
            )
        state_file = sb.config.numbers_state_file
        if state_file is not None and state_file.exists():
            self.owned.update(json.loads(state_file.read_text()))

    def _remember_owned(self) -> None:
        state_file = self.sb.config.numbers_state_file
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps(self.owned))

    def _start(
        self, kind: str, location: str | None, finish: Any, on_fail: Any = None
    ) -> Operation:
        op_id = f"{kind}_{uuid.uuid4()}"
        created = graph_time(self.sb.clock.now())
        op = Operation(op_id, kind, created, location)
        self.state.operations[op_id] = op
        task = asyncio.get_running_loop().create_task(self._run(op, finish, on_fail))
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)
        return op

    async def _run(self, op: Operation, finish: Any, on_fail: Any) -> None:
        await asyncio.sleep(0)
        op.status = "running"
        op.last_action = graph_time(self.sb.clock.now())
        await asyncio.sleep(self.sb.config.lro_delay_s)
        if op.kind in self.state.fail_next:
            self.state.fail_next.discard(op.kind)
            op.status = "failed"
            op.error = {
                "code": "PurchaseFailed" if op.kind == "purchase" else "SearchFailed",
                "message": f"The {op.kind} operation failed (sandbox failure injection).",
            }
            if on_fail is not None:
                on_fail()
        else:
            finish()
            op.status = "succeeded"
        op.last_action = graph_time(self.sb.clock.now())

    def _accepted(self, op: Operation, extra: dict[str, str]) -> web.Response:
        headers = {
            "Operation-Location": f"{self.sb.base_url}/phoneNumbers/operations/{op.id}"
            f"?api-version={API_VERSION}",
            "operation-id": op.id,
            "Access-Control-Expose-Headers": "Operation-Location, operation-id",
            **extra,
        }
        return web.Response(status=202, headers=headers)

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        raw = await self.acs.authenticate(request)
        if isinstance(raw, web.Response):
            return raw
        if request.method == "GET" or request.method == "DELETE":
            return {}
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            return error(400, "BadRequest", "Request body is not valid JSON.")
        return data if isinstance(data, dict) else {}

    async def search(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        country = request.match_info["country"].upper()
        kind = body.get("phoneNumberType")
        assignment = body.get("assignmentType")
        caps = body.get("capabilities") or {}
        quantity = body.get("quantity", 1)
        if country != "US":
            return error(400, "BadRequest", f"Country {country} is not supported.")
        if kind not in ("tollFree", "geographic"):
            return error(400, "BadRequest", "phoneNumberType must be tollFree or geographic.")
        if assignment not in ("application", "person"):
            return error(400, "BadRequest", "assignmentType must be application or person.")
        if caps.get("sms") not in CAPABILITY_VALUES or caps.get("calling") not in CAPABILITY_VALUES:
            return error(400, "BadRequest", "capabilities.sms and capabilities.calling required.")
        if not isinstance(quantity, int) or not 1 <= quantity <= 10:
            return error(400, "BadRequest", "quantity must be between 1 and 10.")
        search_id = str(uuid.uuid4())
        location = f"/availablePhoneNumbers/searchResults/{search_id}?api-version={API_VERSION}"

        def finish() -> None:
            prefix = secrets.choice(TOLL_FREE_PREFIXES) if kind == "tollFree" else "425"
            numbers = [f"+1{prefix}555{secrets.randbelow(10000):04d}" for _ in range(quantity)]
            expires = self.sb.clock.now() + timedelta(minutes=16)
            self.state.searches[search_id] = {
                "searchId": search_id,
                "phoneNumbers": numbers,
                "phoneNumberType": kind,
                "assignmentType": assignment,
                "capabilities": caps,
                "cost": {"amount": 2.0, "currencyCode": "USD", "billingFrequency": "monthly"},
                "searchExpiresBy": graph_time(expires),
                "isAgreementToNotResellRequired": False,
            }

        op = self._start("search", location, finish)
        return self._accepted(
            op, {"search-id": search_id, "Location": f"{self.sb.base_url}{location}"}
        )

    async def search_result(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        result = self.state.searches.get(request.match_info["id"])
        if result is None:
            return error(404, "NotFound", "The search was not found or has not completed.")
        return web.json_response(result)

    async def purchase(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        search_id = str(body.get("searchId") or "")
        result = self.state.searches.get(search_id)
        if result is None:
            return error(404, "NotFound", f"Search {search_id} was not found.")
        if search_id in self.state.purchased_searches:
            return error(409, "Conflict", f"Search {search_id} was already purchased.")
        self.state.purchased_searches.add(search_id)

        def finish() -> None:
            now = graph_time(self.sb.clock.now())
            for n in result["phoneNumbers"]:
                self.owned[n] = number_record(
                    n, result["phoneNumberType"], result["assignmentType"],
                    result["capabilities"], now,
                )  # fmt: skip
            self._remember_owned()

        def release() -> None:  # a failed purchase may be retried with the same search
            self.state.purchased_searches.discard(search_id)

        op = self._start("purchase", None, finish, release)
        return self._accepted(op, {"purchase-id": op.id})

    async def operation(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        op = self.state.operations.get(request.match_info["id"])
        if op is None:
            return error(404, "NotFound", "Operation not found.")
        headers = {"Retry-After": "1"} if op.status in ("notStarted", "running") else {}
        return web.json_response(op.public(), headers=headers)

    async def list_numbers(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        return web.json_response({"value": list(self.owned.values()), "nextLink": None})

    async def get_number(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        number = unquote(request.match_info["number"]).replace(" ", "+")
        if not number.startswith("+"):
            number = "+" + number
        rec = self.owned.get(number)
        if rec is None:
            return error(404, "NotFound", f"Phone number {number} not found.")
        return web.json_response(rec)

    async def admin_fail_next(self, request: web.Request) -> web.Response:
        body = await request.json()
        kind = str(body.get("operation", "purchase"))
        self.state.fail_next.add(kind)
        return web.json_response({"failNext": sorted(self.state.fail_next)})

    async def admin_delay(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.sb.config.lro_delay_s = float(body["seconds"])
        return web.json_response({"seconds": self.sb.config.lro_delay_s})

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/availablePhoneNumbers/countries/{country}/:search", self.search)
        router.add_get("/availablePhoneNumbers/searchResults/{id}", self.search_result)
        router.add_post("/availablePhoneNumbers/:purchase", self.purchase)
        router.add_get("/phoneNumbers/operations/{id}", self.operation)
        router.add_get("/phoneNumbers", self.list_numbers)
        router.add_get("/phoneNumbers/{number}", self.get_number)
        router.add_post("/_sandbox/acs/numbers/fail-next", self.admin_fail_next)
        router.add_post("/_sandbox/acs/numbers/delay", self.admin_delay)
