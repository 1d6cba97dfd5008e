"""Local stand-in for Microsoft Entra ID, Microsoft Graph and Azure Communication Services.

It speaks the real protocols (paths, payloads, status codes, refusals) so that production
adapters work unchanged against it or against the real cloud, differing only in base URLs.
Production code must never import from ``sandbox``.
"""

from sandbox.microsoft.app import create_app, start_sandbox
from sandbox.microsoft.config import SandboxConfig

__all__ = ["SandboxConfig", "create_app", "start_sandbox"]
