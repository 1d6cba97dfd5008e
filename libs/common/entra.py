"""One way to build msal clients for Entra ID, shared by the portals and the gateway."""

from __future__ import annotations

from typing import Any

import msal
import requests
from pydantic import SecretStr


def confidential_client(
    client_id: str,
    client_secret: SecretStr,
    authority: str,
    *,
    ca_bundle: str,
    timeout_s: float,
) -> Any:
    """Synchronous (msal is): build and use it off the event loop. It reads the authority's
    discovery document when constructed."""
    session = requests.Session()
    # requests would let REQUESTS_CA_BUNDLE override verification; pin ours.
    session.trust_env = False
    session.verify = ca_bundle or True
    return msal.ConfidentialClientApplication(
        client_id,
        authority=authority,
        client_credential=client_secret.get_secret_value(),
        # Authorities other than Microsoft's (the local stand-in) are not in its instance list.
        instance_discovery=False,
        http_client=session,
        timeout=timeout_s,
    )
