from libs.common.service import run_service
from services.analytics.app import create_app
from services.analytics.settings import AnalyticsSettings

run_service(AnalyticsSettings(), create_app)
