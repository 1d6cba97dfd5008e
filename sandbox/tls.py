"""Local TLS material for the sandboxes: a CA plus a server certificate for 127.0.0.1.

``python -m sandbox.tls [dir]`` writes ``ca.pem``, ``server.pem`` and ``server.key`` into
``dir`` (default ``/work/main/.local/tls``) once; later runs keep the existing files so that
clients which already trust the CA keep working.
"""

from __future__ import annotations

import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TLS_DIR = Path(os.environ.get("SANDBOX_TLS_DIR", "/work/main/.local/tls"))
_FILES = ("ca.pem", "server.pem", "server.key")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the generated CA and server certificate."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key(self) -> Path:
        return self.directory / "server.key"

    def server_context(self) -> ssl.SSLContext:
        """An SSL context for an HTTPS listener serving the local certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A verifying client SSL context that trusts only the local CA."""
        return ssl.create_default_context(cafile=str(self.ca))


def ensure_tls(directory: Path | str = DEFAULT_TLS_DIR) -> TlsFiles:
    """Create the CA and server certificate in ``directory`` unless they already exist."""
    files = TlsFiles(Path(directory))
    if all((files.directory / name).exists() for name in _FILES):
        return files
    import trustme  # dev dependency; imported lazily

    files.directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="EHR video-visit sandbox CA")
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    tmp = files.directory / ".tmp"
    tmp.mkdir(exist_ok=True)
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(tmp / "server.pem"), append=True)
    leaf.private_key_pem.write_to_path(str(tmp / "server.key"))
    os.chmod(tmp / "server.key", 0o600)
    for name in _FILES:
        os.replace(tmp / name, files.directory / name)
    tmp.rmdir()
    return files


def main(argv: list[str]) -> int:
    """Entry point of ``python -m sandbox.tls``."""
    files = ensure_tls(Path(argv[1]) if len(argv) > 1 else DEFAULT_TLS_DIR)
    print(f"CA: {files.ca}\ncert: {files.cert}\nkey: {files.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
