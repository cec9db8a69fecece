"""Live Jupyter dashboards: what a service and a training run are doing."""

from widgets.service_dashboard import ServiceDashboard

__all__ = ["ServiceDashboard"]
