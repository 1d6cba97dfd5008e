from libs.common.service import TlsListener, run_service
from services.launch.app import create_app
from services.launch.settings import LaunchSettings

settings = LaunchSettings()
tls = (
    TlsListener(
        settings.notification_port, settings.notification_tls_cert, settings.notification_tls_key
    )
    if settings.notification_tls_cert
    else None
)
run_service(settings, create_app, tls)
