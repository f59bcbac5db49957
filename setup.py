"""What pyproject.toml cannot say on its own: the top-level `workloads/` folder (one folder
per named workload) installs inside the package as `specbench.workloads.shipped`, so a
non-editable install has the shipped prompt sets too. Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["specbench*"]), "specbench.workloads.shipped"],
    package_dir={"specbench.workloads.shipped": "workloads"},
)
