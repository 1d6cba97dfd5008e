from libs.common.service import run_service
from services.config.app import create_app
from services.config.settings import ConfigSettings

run_service(ConfigSettings(), create_app)
