"""Packaging that pyproject.toml cannot say: the repository's ``widgets/`` folder
installs as ``forge_lite.widgets``, so the kit puts no generic top-level name
(``widgets``) into site-packages beside the user's own packages."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["forge_lite", "forge_lite.*"]), "forge_lite.widgets"],
    package_dir={"forge_lite.widgets": "widgets"},
)
