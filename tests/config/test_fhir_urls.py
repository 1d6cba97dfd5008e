from __future__ import annotations

import pytest

from services.config.fhir_urls import InvalidFhirUrl, check_fhir_base_url, normalise


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/r4/abc",
        "http://127.0.0.1:9100/r4/abc",
        "https://localhost/r4/abc",
        "https://[::1]/r4",
    ],
)
async def test_loopback_is_refused_unless_allowed(url: str) -> None:
    """Without allow_loopback_http, loopback hosts (by name or address) are refused."""
    with pytest.raises(InvalidFhirUrl, match="loopback"):
        await check_fhir_base_url(url, allow_loopback=False)


async def test_loopback_http_is_allowed_for_stand_ins() -> None:
    """With the setting on, a local stand-in on http://127.0.0.1 passes."""
    checked = await check_fhir_base_url("http://127.0.0.1:9100/r4/abc/", allow_loopback=True)
    assert checked.url == "http://127.0.0.1:9100/r4/abc"
    assert checked.addresses == ("127.0.0.1",)


@pytest.mark.parametrize("url", ["https://a..b/r4", f"https://{'x' * 64}.example/r4"])
async def test_a_host_name_the_resolver_cannot_encode_is_refused_clearly(url: str) -> None:
    """An empty or over-long host label is an InvalidFhirUrl (a 422), not a UnicodeError."""
    with pytest.raises(InvalidFhirUrl, match="not a valid host name"):
        await check_fhir_base_url(url, allow_loopback=False)


def test_normalise_keeps_path_case_and_drops_the_trailing_slash() -> None:
    """Scheme and host are lower-cased, the tenant path is kept as typed."""
    assert (
        normalise(" HTTPS://FHIR-EHR.Cerner.com/r4/ec2458f2-1e24-41c8-b71b-0e701af7583d/ ")
        == "https://fhir-ehr.cerner.com/r4/ec2458f2-1e24-41c8-b71b-0e701af7583d"
    )


@pytest.mark.parametrize(
    "url",
    ["https://fhir.example.com/r4/../admin", "https://fhir.example.com/a b", "https://h:99999/r4"],
)
def test_tricky_spellings_are_refused(url: str) -> None:
    """Dot segments, spaces and impossible ports are refused before any lookup."""
    with pytest.raises(InvalidFhirUrl):
        normalise(url)
