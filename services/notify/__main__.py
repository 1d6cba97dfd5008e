from libs.common.service import run_service
from services.notify.app import create_app
from services.notify.settings import NotifySettings

run_service(NotifySettings(), create_app)
