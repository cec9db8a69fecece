"""The notebooks' ``from widgets import ServiceDashboard``.

The dashboards live in the repository's ``widgets/`` folder and install as
``forge_lite.widgets``: a top-level package named ``widgets`` in
site-packages could collide with a learner's own module of that name. This
file, beside the notebooks (a kernel starts in its notebook's folder), keeps
the short import working for them. In your own code, anywhere, write
``from forge_lite.widgets import ServiceDashboard``.
"""

from forge_lite.widgets import ServiceDashboard, TrainingDashboard

__all__ = ["ServiceDashboard", "TrainingDashboard"]
