"""Live Jupyter dashboards: what a service and a training run are doing."""

from .service_dashboard import ServiceDashboard
from .training_dashboard import TrainingDashboard

__all__ = ["ServiceDashboard", "TrainingDashboard"]
