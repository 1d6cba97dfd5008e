"""EHR ("Cerner"/Oracle Health) stand-in: SMART on FHIR, FHIR R4, scheduling feed, PowerChart."""

from sandbox.ehr.app import RunningEhr, create_app, start_ehr
from sandbox.ehr.settings import TENANT_A, TENANT_B, ClientSpec, EhrSettings, TenantSpec
from sandbox.ehr.webhooks import sign_webhook

__all__ = [
    "TENANT_A",
    "TENANT_B",
    "ClientSpec",
    "EhrSettings",
    "RunningEhr",
    "TenantSpec",
    "create_app",
    "sign_webhook",
    "start_ehr",
]
