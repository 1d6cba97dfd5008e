from libs.common.service import run_service
from services.launch.app import create_app
from services.launch.settings import LaunchSettings

run_service(LaunchSettings(), create_app)
