from __future__ import annotations

import asyncio
import base64
import hashlib
import json

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from libs.common.events import IntegrationConfigV1, decode_event
from sandbox.ehr import TENANT_A, TENANT_B
from sandbox.tls import TlsFiles
from tests.config.conftest import CONTOSO_ADMIN, ConfigPortal
from tests.support.browser import Page, chromium
from tests.support.kafka_reader import read_all


def _spki_pin(tls: TlsFiles) -> str:
    """Lets this browser trust exactly the stand-in's certificate, nothing else."""
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def _click(page: Page, selector: str) -> None:
    """Clicks and waits for the page that the click leads to."""
    loaded = page.next_event("Page.loadEventFired")
    await page.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
    await asyncio.wait_for(loaded, 30)


async def _fill(page: Page, values: dict[str, str]) -> None:
    await page.evaluate(
        f"Object.entries({json.dumps(values)}).forEach(([name, value]) => {{"
        " const field = document.querySelector(`#integration-form [name=${name}]`);"
        " field.value = value; })"
    )


async def _add_url(page: Page, portal: ConfigPortal, tenant: str, environment: str) -> None:
    await page.goto(f"{portal.url}/fhir-urls")
    await _fill(
        page,
        {
            "fhir_base_url": portal.fhir_base(tenant),
            "smart_client_id": "teams-connector",
            "client_secret": "s3cret-from-code-console",
            "teams_organizer_id": "dr.lee@contosohealth.onmicrosoft.com",
            "department": "Cardiology" if environment == "test" else "Family medicine",
            "organisation_name": "Contoso Health",
        },
    )
    await page.evaluate(
        f"document.querySelector('#integration-form input[value={environment}]').checked = true"
    )
    await _click(page, "#integration-submit")
    text = await page.text()
    assert "FHIR base URL added" in text, text
    assert "S256 supported" in text


async def test_admin_walks_the_whole_wizard_in_chromium(
    config_portal: ConfigPortal, standin_tls: TlsFiles
) -> None:
    """Sign in, add a test and a production URL, tick both consents, create and link a number,
    and read the integration records, in real headless Chromium, with a screenshot per step."""
    p = config_portal
    async with p.http.post(
        f"{p.microsoft.base_url}/_sandbox/acs/numbers/delay", json={"seconds": 1.0}
    ) as r:
        assert r.status == 200
    pin = f"--ignore-certificate-errors-spki-list={_spki_pin(standin_tls)}"
    async with chromium((pin,)) as page:
        # Headless windows never hold focus, and the clipboard API wants a focused page.
        await page.send("Emulation.setFocusEmulationEnabled", enabled=True)
        await page.send(
            "Browser.grantPermissions",
            origin=p.url,
            permissions=["clipboardReadWrite", "clipboardSanitizedWrite"],
        )
        # 1. Sign in through the Entra stand-in's account picker.
        await page.goto(f"{p.url}/")
        await page.screenshot("config/01-signed-out")
        await _click(page, "#sign-in")
        assert "Pick an account" in await page.text()
        await page.screenshot("config/02-pick-account")
        await _click(page, f"a[href*='login_hint={CONTOSO_ADMIN.replace('@', '%40')}']")
        assert "Setup for your organisation" in await page.text()
        assert CONTOSO_ADMIN in await page.text()
        await page.screenshot("config/03-signed-in")

        # 2. A test URL and a production URL (the EHR stand-in's two tenants).
        await _add_url(page, p, TENANT_A, "test")
        await page.screenshot("config/04-test-url-added")
        await _add_url(page, p, TENANT_B, "production")
        await page.goto(f"{p.url}/fhir-urls")
        assert (
            await page.evaluate("document.querySelectorAll('#integrations tbody tr').length")
        ) == 2
        await page.screenshot("config/05-two-urls")

        # 3. Both consents, then SMS on.
        await page.goto(f"{p.url}/sms")
        await page.evaluate(
            "['vendor_may_send_sms', 'organisation_has_patient_consent', 'enabled']"
            ".forEach(n => document.querySelector(`#sms-form [name=${n}]`).checked = true)"
        )
        await _click(page, "#sms-submit")
        assert "SMS is on" in await page.text()
        assert "Given by" in await page.text()
        await page.screenshot("config/06-sms-consents")

        # 4. Create a number and watch it appear (the page polls the job's progress).
        await page.goto(f"{p.url}/phone-numbers")
        await _click(page, "#create-number")
        assert await page.evaluate("document.querySelector('progress') !== null")
        # The page reloads itself when the job ends; that load is what we wait for.
        reloaded = page.next_event("Page.loadEventFired")
        await page.screenshot("config/07-number-in-progress")
        await asyncio.wait_for(reloaded, 60)
        number = str(await page.evaluate("document.querySelector('.number .e164').textContent"))
        assert number.startswith("+1")
        await page.screenshot("config/08-number-ready")

        # 5. Link the number to both URLs.
        await page.evaluate(
            "document.querySelectorAll('form.links input[name=integration_id]')"
            ".forEach(box => box.checked = true)"
        )
        await _click(page, "form.links .save-links")
        assert "Links saved" in await page.text()
        checked = await page.evaluate(
            "document.querySelectorAll('form.links input[name=integration_id]:checked').length"
        )
        assert checked == 2
        await page.screenshot("config/09-number-linked")

        # 6. The integration records, with working copy buttons.
        await page.goto(f"{p.url}/records")
        text = await page.text()
        assert text.count("/launch/provider/") == 2
        assert text.count("/launch/patient/") == 2
        assert f"SMS from {number}" in text
        await page.evaluate("document.querySelector('button.copy').click()")
        await page.wait_until("document.querySelector('button.copy').textContent === 'Copied'")
        copied = await page.evaluate("navigator.clipboard.readText()")
        assert copied == await page.evaluate(
            "document.getElementById(document.querySelector('button.copy').dataset.copy)"
            ".textContent.trim()"
        )
        assert "/launch/provider/" in copied
        await page.screenshot("config/10-integration-records")

    _, listed = await p.call(CONTOSO_ADMIN, "GET", "/api/integrations")
    assert {i["environment"] for i in listed["integrations"]} == {"test", "production"}
    raw = await read_all(p.settings.topic("integration-config"), expect=6)
    latest: dict[str, IntegrationConfigV1] = {}
    for event in map(decode_event, raw):
        payload = event.payload
        assert isinstance(payload, IntegrationConfigV1)
        if event.key not in latest or payload.config_version > latest[event.key].config_version:
            latest[event.key] = payload
    assert len(latest) == 2
    assert all(x.sms_enabled and x.sms_from_number == number for x in latest.values())
