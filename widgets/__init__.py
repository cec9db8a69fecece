"""Live Jupyter dashboards: what a service and a training run are doing."""

from widgets.service_dashboard import ServiceDashboard
from widgets.training_dashboard import TrainingDashboard

__all__ = ["ServiceDashboard", "TrainingDashboard"]
