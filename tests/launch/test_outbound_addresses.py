"""The launch gateway's outbound client connects only to public addresses (loopback too while
the local stand-ins are allowed), checked on the address it is about to connect to: a FHIR
base, token endpoint or JWKS URL whose name resolves inside our network at launch time (DNS
rebinding after the config service's check) reaches nothing, and the launch fails cleanly."""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography.hazmat.primitives.asymmetric import rsa

from libs.common.addresses import private_networks
from libs.common.web import SETTINGS
from services.launch.fhir import FhirClient, FhirError
from services.launch.integrations import Integration
from services.launch.outbound import (
    HTTP,
    OutboundError,
    PublicAddressResolver,
    RefusedAddress,
    check_endpoint,
    guarded_socket_factory,
    outbound_connector,
    outbound_http_ctx,
    refusal,
)
from services.launch.settings import LaunchSettings
from services.launch.smart import SmartClient, SmartConfiguration, SmartError

NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts and answers any
    request with 204: a connection the gateway should never have made shows as a count."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(NO_CONTENT)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    listener = Listener()
    server = await asyncio.start_server(listener._accept, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    async with server:
        yield listener


@asynccontextmanager
async def gateway_http(
    allow_loopback_http: bool, outbound_private_networks: str = ""
) -> AsyncIterator[aiohttp.ClientSession]:
    """The outbound session exactly as the gateway's startup builds it."""
    app = web.Application()
    app[SETTINGS] = LaunchSettings(
        allow_loopback_http=allow_loopback_http,
        external_call_timeout_s=5,
        outbound_private_networks=outbound_private_networks,
    )
    context = outbound_http_ctx(app)
    await anext(context)
    try:
        yield app[HTTP]
    finally:
        await anext(context, None)


class NamedResolver(AbstractResolver):
    """Test DNS: each name answers the addresses `answers` holds for it right now."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.answers:
            raise OSError(f"{host} is not known")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers[host]
        ]

    async def close(self) -> None:
        return None


@asynccontextmanager
async def session_with_dns(
    answers: dict[str, list[str]],
) -> AsyncIterator[tuple[aiohttp.ClientSession, aiohttp.TCPConnector]]:
    """The gateway's connector (stand-in allowance on, as in tests and `make run`) over a
    test resolver, so a name can resolve to a private address."""
    resolver = PublicAddressResolver(True, NamedResolver(answers))
    connector = outbound_connector(ssl.create_default_context(), True, resolver)
    async with aiohttp.ClientSession(connector=connector) as http:
        yield http, connector


def integration() -> Integration:
    settings = LaunchSettings()
    integration_id = uuid.uuid4()
    return Integration(
        integration_id=integration_id,
        tenant_id="contoso",
        fhir_base_url="https://localhost/r4/t",
        environment="test",
        department="Cardiology",
        organisation_name="Contoso Health",
        ms_tenant_id="contoso",
        smart_client_id="teams-connector",
        client_auth_method="client_secret_basic",
        client_secret_encrypted=settings.field_cipher().encrypt(
            "s3cret", f"integration-secret:{integration_id}"
        ),
        private_key_encrypted=None,
        pkce_mode="required",
        teams_organizer_id="dr.lee@contosohealth.onmicrosoft.com",
        sms_enabled=False,
    )


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::ffff:127.0.0.1]"])
async def test_loopback_is_refused_at_connect_time_without_the_allowance(
    listener: Listener, host: str
) -> None:
    """With allow_loopback_http off (production), a name resolving to loopback, a loopback
    address and its IPv4-mapped spelling are refused before any connection is made."""
    async with gateway_http(allow_loopback_http=False) as http:
        with pytest.raises(aiohttp.ClientConnectorError) as refused:
            await http.get(f"https://{host}:{listener.port}/token")
    assert isinstance(refused.value.os_error, RefusedAddress)
    assert "a loopback address" in refusal(refused.value)
    assert listener.accepted == 0


async def test_the_stand_in_allowance_still_reaches_loopback(listener: Listener) -> None:
    """With allow_loopback_http on (tests, `make run`), the same client reaches a loopback
    stand-in by name and by address."""
    async with gateway_http(allow_loopback_http=True) as http:
        for host in ("localhost", "127.0.0.1"):
            async with http.get(f"http://{host}:{listener.port}/") as response:
                assert response.status == 204
    assert listener.accepted == 2


async def test_private_answers_are_dropped_and_a_private_only_name_is_refused(
    listener: Listener,
) -> None:
    """Of a DNS answer only the public (here: allowed loopback) addresses are connected to;
    a name answering only link-local or private addresses fails at resolution, clearly."""
    answers = {
        "mixed.test": ["10.0.0.5", "127.0.0.1"],
        "metadata.test": ["169.254.169.254"],
        "intranet.test": ["192.168.1.1", "fd00::5"],
    }
    async with session_with_dns(answers) as (http, _):
        async with http.get(f"http://mixed.test:{listener.port}/") as response:
            assert response.status == 204
        for host, says in (("metadata.test", "link-local"), ("intranet.test", "private")):
            with pytest.raises(aiohttp.ClientConnectorDNSError) as refused:
                await http.get(f"http://{host}:{listener.port}/")
            assert isinstance(refused.value.os_error, RefusedAddress)
            assert says in refusal(refused.value)
    assert listener.accepted == 1


async def test_a_host_name_the_resolver_cannot_encode_is_a_client_error() -> None:
    """An endpoint host with an empty label ("a..b") fails as a refused address, not a 500."""
    resolver = PublicAddressResolver(False)
    connector = outbound_connector(ssl.create_default_context(), False, resolver)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            with pytest.raises(aiohttp.ClientConnectorDNSError) as refused:
                await http.post("https://a..b/token")
    finally:
        await resolver.close()
    assert "not a valid host name" in refusal(refused.value)


async def test_a_name_rebound_to_a_private_address_is_refused(listener: Listener) -> None:
    """A FHIR host that resolved to an allowed address for one request and to a private one
    for the next (DNS rebinding) is refused on the next, without a connection."""
    answers = {"ehr.rebind.test": ["127.0.0.1"]}
    async with session_with_dns(answers) as (http, connector):
        async with http.get(f"http://ehr.rebind.test:{listener.port}/r4/t/metadata") as response:
            assert response.status == 204
        answers["ehr.rebind.test"] = ["10.0.0.5"]
        connector.clear_dns_cache()  # the short TTL a rebinding attacker serves
        with pytest.raises(aiohttp.ClientConnectorDNSError) as refused:
            await http.get(f"http://ehr.rebind.test:{listener.port}/r4/t/Appointment/1")
    assert "a private network address (10.0.0.5)" in refusal(refused.value)
    assert listener.accepted == 1


async def test_launch_calls_to_a_name_resolving_inside_are_refused_without_a_connection(
    listener: Listener,
) -> None:
    """Discovery (`iss`), the token request (with the client secret), the JWKS fetch and FHIR
    reads whose host resolves to loopback while the allowance is off each fail with a clear
    "refused" error the launch turns into its error page, and nothing connects."""
    base = f"https://localhost:{listener.port}"
    config = SmartConfiguration(
        authorization_endpoint=f"{base}/authorize",
        token_endpoint=f"{base}/token",
        jwks_uri=f"{base}/jwks",
    )
    ehr = integration()
    settings = LaunchSettings()
    async with gateway_http(allow_loopback_http=False) as http:
        smart = SmartClient(http, LaunchSettings(allow_loopback_http=False))
        with pytest.raises(SmartError, match=r"configuration is unreachable \(refused: localhost"):
            await smart.discover(f"{base}/r4/t")
        with pytest.raises(SmartError, match=r"token endpoint is unreachable \(refused: localhost"):
            await smart.exchange_code(
                ehr, config, settings.field_cipher(), code="c", redirect_uri="r", verifier=None
            )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        id_token = jwt.encode({"sub": "1"}, key, algorithm="RS256", headers={"kid": "k1"})
        with pytest.raises(SmartError, match=r"keys are unreachable \(refused: localhost"):
            await smart.validate_id_token(ehr, config, id_token, "n")
        with pytest.raises(FhirError, match="could not be read"):
            await FhirClient(http, f"{base}/r4/t", "token").read_appointment("1")
    assert listener.accepted == 0


async def test_discovery_naming_internal_endpoints_is_refused_cleanly(
    serve: Callable[[web.Application], Any],
) -> None:
    """A SMART configuration naming a token endpoint or JWKS at a private or link-local
    address is refused at discovery with a SmartError (the callback shows its error page;
    it was an unhandled OutboundError there)."""
    document: dict[str, Any] = {}

    async def smart_configuration(_: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/r4/t/.well-known/smart-configuration", smart_configuration)
    async with serve(app) as url, gateway_http(allow_loopback_http=True) as http:
        for field, endpoint, says in (
            ("token_endpoint", "https://169.254.169.254/latest/api/token", "link-local"),
            ("jwks_uri", "https://10.0.0.5/jwks", "private"),
            ("authorization_endpoint", "https://[::ffff:192.168.1.1]/authorize", "private"),
        ):
            document.clear()
            document.update(
                authorization_endpoint=f"{url}/authorize",
                token_endpoint=f"{url}/token",
                jwks_uri=f"{url}/jwks",
            )
            document[field] = endpoint
            smart = SmartClient(http, LaunchSettings(allow_loopback_http=True))
            with pytest.raises(SmartError, match=f"names an endpoint we refuse.*{says}"):
                await smart.discover(f"{url}/r4/t")


HOSPITAL = private_networks("10.20.0.0/16")


def addr_info(address: str, port: int = 443) -> Any:
    """What aiohttp hands the socket factory for one resolved address."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))


async def test_an_address_in_an_allowed_network_passes_the_resolver_and_socket_factory() -> None:
    """With 10.20.0.0/16 allowed (production, no loopback allowance), a hospital name's
    10.20.x address is kept by the resolver and gets a socket from the factory, its
    IPv4-mapped spelling too; the other private answer of the same name is dropped."""
    answers = {"fhir.hospital.test": ["10.20.30.40", "192.168.1.1"]}
    resolver = PublicAddressResolver(False, NamedResolver(answers), allowed_networks=HOSPITAL)
    kept = await resolver.resolve("fhir.hospital.test", 443)
    assert [result["host"] for result in kept] == ["10.20.30.40"]
    create = guarded_socket_factory(False, HOSPITAL)
    for address in ("10.20.30.40", "::ffff:10.20.30.40"):
        create(addr_info(address)).close()


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("10.21.0.1", "a private network address"),
        ("192.168.1.1", "a private network address"),
        ("::ffff:172.16.0.9", "a private network address"),
        ("169.254.169.254", "a link-local address"),
        ("127.0.0.1", "a loopback address"),
    ],
)
async def test_an_address_outside_the_allowed_networks_is_still_refused(
    address: str, says: str
) -> None:
    """With 10.20.0.0/16 allowed, a name resolving only outside it fails at resolution and
    the socket factory refuses the address itself, naming why."""
    resolver = PublicAddressResolver(
        False, NamedResolver({"intranet.test": [address]}), allowed_networks=HOSPITAL
    )
    with pytest.raises(RefusedAddress, match=says):
        await resolver.resolve("intranet.test", 443)
    with pytest.raises(RefusedAddress, match=says):
        guarded_socket_factory(False, HOSPITAL)(addr_info(address))


async def test_with_the_setting_the_gateway_still_refuses_other_addresses_unconnected(
    listener: Listener,
) -> None:
    """The gateway's session built with outbound_private_networks set refuses a loopback
    name and address (no allowance) and a private address outside the allowed network before
    any connection is made."""
    async with gateway_http(False, outbound_private_networks="10.20.0.0/16") as http:
        for host in ("localhost", "127.0.0.1", "192.168.1.1", "[::ffff:10.21.0.1]"):
            with pytest.raises(aiohttp.ClientConnectorError) as refused:
                await http.get(f"https://{host}:{listener.port}/token")
            assert isinstance(refused.value.os_error, RefusedAddress)
            assert "refused" in refusal(refused.value)
    assert listener.accepted == 0


def test_an_endpoint_in_an_allowed_network_passes_and_https_is_still_required() -> None:
    """An endpoint URL at an allowed private address passes the gateway's endpoint check;
    plain http to it, and https to a private address outside it, are refused."""
    assert check_endpoint("https://10.20.30.40/token", False, HOSPITAL)
    with pytest.raises(OutboundError, match="must use https"):
        check_endpoint("http://10.20.30.40/token", True, HOSPITAL)
    with pytest.raises(OutboundError, match="a private network address"):
        check_endpoint("https://10.21.0.1/token", False, HOSPITAL)
    with pytest.raises(OutboundError, match="a private network address"):
        check_endpoint("https://10.20.30.40/token", False)


async def test_discovery_naming_endpoints_in_an_allowed_network_is_accepted(
    serve: Callable[[web.Application], Any],
) -> None:
    """With 10.20.0.0/16 allowed, a SMART configuration naming its token endpoint and JWKS
    at 10.20.x is accepted at discovery; one naming the metadata address is still refused."""
    document: dict[str, Any] = {}

    async def smart_configuration(_: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/r4/t/.well-known/smart-configuration", smart_configuration)
    settings = LaunchSettings(allow_loopback_http=True, outbound_private_networks="10.20.0.0/16")
    async with serve(app) as url, gateway_http(True, "10.20.0.0/16") as http:
        document.update(
            authorization_endpoint=f"{url}/authorize",
            token_endpoint="https://10.20.30.40/token",
            jwks_uri="https://10.20.30.41/jwks",
        )
        found = await SmartClient(http, settings).discover(f"{url}/r4/t")
        assert found.token_endpoint == "https://10.20.30.40/token"
        document["jwks_uri"] = "https://169.254.169.254/jwks"
        with pytest.raises(SmartError, match=r"names an endpoint we refuse.*link-local"):
            await SmartClient(http, settings).discover(f"{url}/r4/t")
