"""Contract tests: SMART discovery, CapabilityStatement and JWKS of the EHR stand-in."""

from __future__ import annotations

from sandbox.ehr import TENANT_A, TENANT_B, RunningEhr
from tests.sandbox.ehr_helpers import Smart

SMART_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


async def test_fhir_base_uses_127_0_0_1_and_tenant_guid(ehr: RunningEhr) -> None:
    """Each tenant's FHIR base is http://127.0.0.1:<port>/r4/<guid>."""
    assert ehr.fhir_base(TENANT_A) == f"{ehr.url}/r4/{TENANT_A}"
    assert ehr.url.startswith("http://127.0.0.1:")
    assert ehr.fhir_base(TENANT_A) != ehr.fhir_base(TENANT_B)


async def test_smart_configuration_advertises_endpoints_and_s256(smart: Smart) -> None:
    """smart-configuration lists Cerner-style endpoints, S256 PKCE and both client auth methods."""
    cfg = await smart.config()
    auth_base = f"{smart.ehr.url}/tenants/{TENANT_A}/protocols/oauth2/profiles/smart-v1"
    assert cfg["authorization_endpoint"] == f"{auth_base}/personas/provider/authorize"
    assert cfg["token_endpoint"] == f"{auth_base}/token"
    assert cfg["jwks_uri"] == f"{auth_base}/jwks"
    assert cfg["code_challenge_methods_supported"] == ["S256"]
    assert {"client_secret_basic", "private_key_jwt"} <= set(
        cfg["token_endpoint_auth_methods_supported"]
    )
    assert {"launch-ehr", "sso-openid-connect", "context-ehr-patient"} <= set(cfg["capabilities"])
    assert "user/Appointment.read" in cfg["scopes_supported"]
    assert not any("*" in s for s in cfg["scopes_supported"])


async def test_metadata_is_r4_capability_statement_with_oauth_uris(smart: Smart) -> None:
    """metadata is an R4 CapabilityStatement (application/fhir+json) carrying SMART oauth-uris."""
    async with smart.http.get(f"{smart.base}/metadata") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/fhir+json"
        cap = await resp.json(content_type=None)
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1"
    ext = cap["rest"][0]["security"]["extension"][0]
    assert ext["url"] == SMART_OAUTH_URIS
    uris = {e["url"]: e["valueUri"] for e in ext["extension"]}
    cfg = await smart.config()
    assert uris == {"authorize": cfg["authorization_endpoint"], "token": cfg["token_endpoint"]}


async def test_jwks_publishes_rsa_signing_key_per_tenant(smart: Smart) -> None:
    """Each tenant publishes its own RS256 key at jwks_uri."""
    kids = []
    for tenant in (TENANT_A, TENANT_B):
        other = Smart(smart.ehr, smart.http, tenant)
        async with smart.http.get((await other.config())["jwks_uri"]) as resp:
            keys = (await resp.json())["keys"]
        assert keys[0]["kty"] == "RSA"
        assert keys[0]["alg"] == "RS256"
        assert "d" not in keys[0]
        kids.append(keys[0]["kid"])
    assert kids[0] != kids[1]


async def test_unknown_tenant_is_404(smart: Smart) -> None:
    """A FHIR base with an unknown tenant GUID does not exist."""
    url = f"{smart.ehr.url}/r4/00000000-0000-0000-0000-000000000000/metadata"
    async with smart.http.get(url) as resp:
        assert resp.status == 404
