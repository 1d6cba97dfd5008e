from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.config.conftest import (
    CONTOSO_ADMIN,
    CONTOSO_ADMIN_OID,
    TENANT_B,
    ConfigPortal,
    Serve,
    table_counts,
)
from tests.conftest import free_port
from tests.support.rsa_keys import mersenne_rsa_key as _mersenne_rsa_key
from tests.support.rsa_keys import pem as _pem


def _der(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


def unsupported_curve_key() -> str:
    """A PKCS#8 EC key on secp160k1: OpenSSL reads it, `cryptography` does not support it."""
    algorithm = _der(
        0x30, _der(0x06, bytes.fromhex("2a8648ce3d0201")) + _der(0x06, bytes.fromhex("2b81040009"))
    )
    ec_key = _der(0x30, _der(0x02, b"\x01") + _der(0x04, (12345).to_bytes(21, "big")))
    info = _der(0x30, _der(0x02, b"\x00") + algorithm + _der(0x04, ec_key))
    body = base64.encodebytes(info).decode()
    return f"-----BEGIN PRIVATE KEY-----\n{body}-----END PRIVATE KEY-----\n"


@pytest.fixture
async def odd_servers(serve: Serve) -> AsyncIterator[str]:
    """Loopback servers that are reachable but are not (usable) SMART servers."""

    async def not_json(_: web.Request) -> web.Response:
        return web.Response(text="<html>Welcome</html>", content_type="text/html")

    async def huge(_: web.Request) -> web.Response:
        return web.json_response({"padding": "x" * 200_000})

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("https://evil.example/.well-known/smart-configuration")

    async def no_endpoints(_: web.Request) -> web.Response:
        return web.json_response({"capabilities": ["launch-ehr"]})

    def usable_but(**odd: Any) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def smart(request: web.Request) -> web.Response:
            origin = f"http://{request.host}"
            return web.json_response(
                {
                    "authorization_endpoint": f"{origin}/authorize",
                    "token_endpoint": f"{origin}/token",
                    "code_challenge_methods_supported": ["S256"],
                    **odd,
                }
            )

        return smart

    app = web.Application()
    app.router.add_get("/html/.well-known/smart-configuration", not_json)
    app.router.add_get("/huge/.well-known/smart-configuration", huge)
    app.router.add_get("/redirect/.well-known/smart-configuration", redirect)
    app.router.add_get("/empty/.well-known/smart-configuration", no_endpoints)
    # Valid JSON that a jsonb column refuses (it was a 500 on save), and an unbounded item.
    app.router.add_get(
        "/nul-scope/.well-known/smart-configuration", usable_but(scopes_supported=["launch\x00"])
    )
    app.router.add_get("/nul-issuer/.well-known/smart-configuration", usable_but(issuer="x\x00"))
    app.router.add_get(
        "/long-scope/.well-known/smart-configuration", usable_but(scopes_supported=["s" * 5000])
    )
    async with serve(app) as url:
        yield url


async def test_admin_adds_test_and_production_urls(config_portal: ConfigPortal) -> None:
    """An admin adds two FHIR base URLs; each shows the SMART configuration found."""
    p = config_portal
    status, test_url = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    assert status == 201, test_url
    status, prod_url = await p.call(
        CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(TENANT_B)
    )
    assert status == 201, prod_url
    assert test_url["environment"] == "test"
    assert prod_url["environment"] == "production"
    smart = test_url["smart_configuration"]
    assert smart["token_endpoint"].startswith(p.ehr.url)
    assert "S256" in smart["code_challenge_methods_supported"]
    assert smart["capabilities"]
    assert test_url["client_secret_set"] is True
    assert "s3cret" not in str(test_url)
    status, listed = await p.call(CONTOSO_ADMIN, "GET", "/api/integrations")
    assert status == 200
    assert [i["id"] for i in listed["integrations"]] == [test_url["id"], prod_url["id"]]
    status, one = await p.call(CONTOSO_ADMIN, "GET", f"/api/integrations/{test_url['id']}")
    assert status == 200
    assert one["fhir_base_url"] == p.fhir_base()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("not a url", "not allowed"),
        ("fhir.example.com/r4", "https://"),
        ("https://", "no host"),
        ("ftp://fhir.example.com/r4", "https://"),
        ("http://8.8.8.8/r4/abc", "must use https"),
        ("https://user:pw@fhir.example.com/r4", "user name or password"),
        ("https://fhir.example.com/r4#frag", "fragment"),
        ("https://fhir.example.com/r4?x=1", "query"),
        ("https://10.1.2.3/r4/abc", "private"),
        ("https://192.168.10.20/r4/abc", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[fe80::1]/r4", "link-local"),
        ("https://[::ffff:10.0.0.1]/r4", "private"),
        ("https://0.0.0.0/r4", "reserved"),
    ],
)
async def test_bad_url_is_refused_and_changes_nothing(
    config_portal: ConfigPortal, url: str, says: str
) -> None:
    """Malformed, non-https, userinfo, fragment and private-address URLs get a clear 422."""
    p = config_portal
    status, body = await p.call(
        CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(fhir_base_url=url)
    )
    assert status == 422, body
    assert body["field"] == "fhir_base_url"
    assert says in body["error"]
    assert await table_counts(p.settings) == {
        "integrations": 0, "outbox": 0, "audit_log": 0, "phone_numbers": 0,
    }  # fmt: skip


async def test_unreachable_url_is_refused(config_portal: ConfigPortal) -> None:
    """A URL nobody answers on is refused with 422 "unreachable"."""
    p = config_portal
    url = f"http://127.0.0.1:{free_port()}/r4/abc"
    status, body = await p.call(
        CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(fhir_base_url=url)
    )
    assert status == 422
    assert "unreachable" in body["error"]
    assert (await table_counts(p.settings))["integrations"] == 0


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/html", "not JSON"),
        ("/huge", "larger than"),
        ("/redirect", "redirects elsewhere"),
        ("/empty", "not a usable SMART configuration"),
        ("/nul-scope", "not a usable SMART configuration (problem with: scopes_supported)"),
        ("/nul-issuer", "not a usable SMART configuration (problem with: issuer)"),
        ("/long-scope", "not a usable SMART configuration (problem with: scopes_supported)"),
        ("/missing", "HTTP 404"),
    ],
)
async def test_url_that_is_not_smart_is_refused(
    config_portal: ConfigPortal, odd_servers: str, path: str, says: str
) -> None:
    """Reachable servers without a usable SMART configuration are refused with 422."""
    p = config_portal
    status, body = await p.call(
        CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(fhir_base_url=odd_servers + path)
    )
    assert status == 422, body
    assert says in body["error"]
    assert (await table_counts(p.settings))["integrations"] == 0


async def test_same_url_twice_is_a_conflict(config_portal: ConfigPortal) -> None:
    """A tenant cannot configure one FHIR base URL twice (trailing slash ignored)."""
    p = config_portal
    assert (await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration()))[0] == 201
    again = p.integration(fhir_base_url=p.fhir_base() + "/")
    status, body = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", again)
    assert status == 409
    assert "already configured" in body["error"]


async def test_edit_keeps_the_secret_unless_replaced(config_portal: ConfigPortal) -> None:
    """An edit without a secret keeps the stored one; the audit log masks both versions."""
    p = config_portal
    _, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    path = f"/api/integrations/{created['id']}"
    edit = p.integration(department="Dermatology", pkce_mode="if_supported")
    del edit["client_secret"]
    status, edited = await p.call(CONTOSO_ADMIN, "PUT", path, edit)
    assert status == 200, edited
    assert edited["department"] == "Dermatology"
    assert edited["client_secret_set"] is True
    assert edited["config_version"] > created["config_version"]
    status, _ = await p.call(CONTOSO_ADMIN, "PUT", path, p.integration(client_secret="n3w-s3cret"))
    assert status == 200
    _, audit = await p.call(CONTOSO_ADMIN, "GET", "/api/audit")
    actions = [e["action"] for e in audit["entries"]]
    assert actions == ["integration.updated", "integration.updated", "integration.created"]
    first_edit = audit["entries"][1]
    assert first_edit["actor_oid"] == CONTOSO_ADMIN_OID
    assert first_edit["actor_upn"] == CONTOSO_ADMIN
    assert first_edit["before"]["department"] == "Cardiology"
    assert first_edit["after"]["department"] == "Dermatology"
    assert audit["entries"][0]["after"]["credential_replaced"] is True
    assert "s3cret" not in str(audit)


async def test_disable_and_remove(config_portal: ConfigPortal) -> None:
    """A URL can be disabled (kept, launches refused) and removed (gone, 404 afterwards)."""
    p = config_portal
    _, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    path = f"/api/integrations/{created['id']}"
    status, disabled = await p.call(CONTOSO_ADMIN, "PUT", path, p.integration(enabled=False))
    assert status == 200
    assert disabled["enabled"] is False
    status, enabled = await p.call(CONTOSO_ADMIN, "PUT", f"{path}/enabled", {"enabled": True})
    assert status == 200
    assert enabled["enabled"] is True
    status, _ = await p.call(CONTOSO_ADMIN, "PUT", f"{path}/enabled", {"enabled": "yes"})
    assert status == 422
    await p.ehr.close()  # the EHR is down: disabling must still work
    status, disabled = await p.call(CONTOSO_ADMIN, "PUT", f"{path}/enabled", {"enabled": False})
    assert status == 200
    assert disabled["enabled"] is False
    status, _ = await p.call(CONTOSO_ADMIN, "DELETE", path)
    assert status == 204
    status, _ = await p.call(CONTOSO_ADMIN, "GET", path)
    assert status == 404
    status, _ = await p.call(CONTOSO_ADMIN, "DELETE", path)
    assert status == 404


async def test_private_key_jwt_takes_an_es384_key(config_portal: ConfigPortal) -> None:
    """private_key_jwt accepts an EC P-384 PEM, stores it encrypted, never shows it back."""
    p = config_portal
    pem = _pem(ec.generate_private_key(ec.SECP384R1()))
    body = p.integration(client_auth_method="private_key_jwt", client_secret=None, private_key=pem)
    status, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", body)
    assert status == 201, created
    assert created["private_key_set"] is True
    assert created["client_secret_set"] is False
    assert "PRIVATE KEY" not in str(created)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"client_auth_method": "private_key_jwt", "client_secret": None,
          "private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"},
         "private_key"),
        ({"client_auth_method": "private_key_jwt", "client_secret": None}, "private_key"),
        ({"client_secret": None}, "client_secret"),
        # Within 4096 characters, but its ciphertext overflowed the event (a 500 before).
        ({"client_secret": "é" * 4096}, "client_secret"),
        ({"client_secret": "s3cret\n"}, "client_secret"),
        ({"client_auth_method": "private_key_jwt", "client_secret": None,
          "private_key": "€" * 4096}, "private_key"),
        ({"environment": "staging"}, "environment"),
        ({"pkce_mode": "sometimes"}, "pkce_mode"),
        ({"teams_organizer_id": "not an account"}, "teams_organizer_id"),
        ({"department": "<script>alert(1)</script>"}, "department"),
        ({"smart_client_id": ""}, "smart_client_id"),
        ({"surprise": True}, "surprise"),
        ({"enabled": "yes"}, "enabled"),
    ],
)  # fmt: skip
async def test_invalid_fields_are_refused(
    config_portal: ConfigPortal, overrides: dict[str, Any], field: str
) -> None:
    """Each invalid field gets a 422 naming it, and nothing is stored."""
    p = config_portal
    body = p.integration(**overrides)
    status, answer = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", body)
    assert status == 422, answer
    assert answer["field"] == field
    assert (await table_counts(p.settings))["integrations"] == 0


async def test_the_longest_client_secret_reaches_the_gateway(config_portal: ConfigPortal) -> None:
    """A client secret of the largest accepted size is saved: its integration-config event,
    built in the same transaction, holds its ciphertext."""
    p = config_portal
    secret = "".join(chr(0x20 + i % 95) for i in range(4096))
    status, created = await p.call(
        CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(client_secret=secret)
    )
    assert status == 201, created
    assert created["client_secret_set"] is True
    assert (await table_counts(p.settings))["integrations"] == 1


async def test_weak_rsa_key_is_refused(config_portal: ConfigPortal) -> None:
    """An RSA key under 2048 bits cannot be used for private_key_jwt."""
    p = config_portal
    pem = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505 - the point of the test
    body = p.integration(client_auth_method="private_key_jwt", client_secret=None, private_key=pem)
    status, answer = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", body)
    assert status == 422
    assert "2048" in answer["error"]


async def test_rsa_key_over_4096_bits_is_refused(config_portal: ConfigPortal) -> None:
    """An RSA key over 4096 bits gets a 422 naming private_key, and nothing is stored."""
    p = config_portal
    pem = _mersenne_rsa_key(2281, 2203)  # 4484 bits, 3.6 KB
    body = p.integration(client_auth_method="private_key_jwt", client_secret=None, private_key=pem)
    status, answer = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", body)
    assert status == 422, answer
    assert answer["field"] == "private_key"
    assert "4096" in answer["error"]
    assert (await table_counts(p.settings))["integrations"] == 0


async def test_rsa_4096_bit_key_fits_even_with_crlf_line_ends(config_portal: ConfigPortal) -> None:
    """The largest accepted RSA key fits the length limit with a browser form's CRLF lines."""
    p = config_portal
    pem = _pem(rsa.generate_private_key(public_exponent=65537, key_size=4096))
    body = p.integration(
        client_auth_method="private_key_jwt",
        client_secret=None,
        private_key=pem.replace("\n", "\r\n"),
    )
    status, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", body)
    assert status == 201, created
    assert created["private_key_set"] is True


async def test_rsa_key_with_a_large_prime_is_refused_unchecked(
    config_portal: ConfigPortal,
) -> None:
    """A key whose primes are not half its size each (slow to check) is refused at once."""
    p = config_portal
    await p.session(CONTOSO_ADMIN)
    pem = _mersenne_rsa_key(3217, 607)  # 3824 bits; checking its 3217-bit prime takes ~2 s
    body = p.integration(client_auth_method="private_key_jwt", client_secret=None, private_key=pem)
    loop = asyncio.get_running_loop()
    worst = 0.0

    async def tick() -> None:
        nonlocal worst
        while True:
            started = loop.time()
            await asyncio.sleep(0.01)
            worst = max(worst, loop.time() - started)

    ticker = asyncio.create_task(tick())
    try:
        status, answer = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", body)
    finally:
        ticker.cancel()
    assert status == 422, answer
    assert answer["field"] == "private_key"
    # The check would stall it ~2 s here; 1 s leaves room for a loaded CI machine's own pauses.
    assert worst < 1.0, f"the event loop stalled for {worst:.1f}s while the key was checked"


# Another process polls /healthz and prints the slowest answer (a thread would share our GIL).
_HEALTHZ_PROBE = """
import sys, time, urllib.request
url, worst, end = sys.argv[1], 0.0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t = time.perf_counter()
    urllib.request.urlopen(url, timeout=120).read()
    worst = max(worst, time.perf_counter() - t)
    time.sleep(0.1)
print(worst)
"""


async def test_large_rsa_key_does_not_freeze_the_service(config_portal: ConfigPortal) -> None:
    """An 8676-bit RSA key (about 9 s to check; its PEM is over the field's 4,096 characters)
    is refused at once; /healthz stays quick."""
    p = config_portal
    await p.session(CONTOSO_ADMIN)
    pem = _mersenne_rsa_key(4423, 4253)
    body = p.integration(client_auth_method="private_key_jwt", client_secret=None, private_key=pem)
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HEALTHZ_PROBE, f"{p.url}/healthz", "4",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(0.5)
    status, answer = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", body)
    out, _ = await probe.communicate()
    worst = float(out)
    assert worst < 2.0, f"/healthz took {worst:.1f}s while one admin's key was checked ({status})"
    assert status == 422, answer
    assert answer["field"] == "private_key"


async def test_private_key_on_an_unsupported_curve_is_refused(config_portal: ConfigPortal) -> None:
    """An EC key on a curve the library cannot load gets a 422 naming private_key, not a 500."""
    p = config_portal
    before = await table_counts(p.settings)
    body = p.integration(
        client_auth_method="private_key_jwt",
        client_secret=None,
        private_key=unsupported_curve_key(),
    )
    status, answer = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", body)
    assert status == 422, answer
    assert answer["field"] == "private_key"
    assert await table_counts(p.settings) == before


async def test_hostile_bodies_get_clear_4xx(config_portal: ConfigPortal) -> None:
    """Oversized (413), non-JSON (415), malformed JSON (400) and non-object (422) bodies."""
    p = config_portal
    session = await p.session(CONTOSO_ADMIN)
    cases: list[tuple[bytes, str, int]] = [
        (b"{" + b" " * 70_000 + b"}", "application/json", 413),
        (b"fhir_base_url=x", "application/x-www-form-urlencoded", 415),
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 422),
    ]
    for raw, content_type, expected in cases:
        async with p.http.post(
            f"{p.url}/api/integrations",
            data=raw,
            headers={**session.headers(), "Content-Type": content_type},
        ) as response:
            assert response.status == expected, await response.text()
            assert "error" in await response.json()
    assert await table_counts(p.settings) == {
        "integrations": 0, "outbox": 0, "audit_log": 0, "phone_numbers": 0,
    }  # fmt: skip


async def test_records_are_derived_from_settings(config_portal: ConfigPortal) -> None:
    """Launch URLs come from launch_public_base_url and the integration id."""
    p = config_portal
    _, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    status, body = await p.call(CONTOSO_ADMIN, "GET", f"/api/integrations/{created['id']}/records")
    assert status == 200
    records = {r["key"]: r["value"] for r in body["records"]}
    assert records["provider_launch_url"] == (
        f"https://launch.example.test/launch/provider/{created['id']}"
    )
    assert records["patient_launch_url"] == (
        f"https://launch.example.test/launch/patient/{created['id']}"
    )
    assert records["redirect_uri"] == "https://launch.example.test/launch/callback"
    assert records["fhir_base_url"] == p.fhir_base()
