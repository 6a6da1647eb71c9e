"""Lists hyrun's packages: every package under runtime/, agent/, planner/, proto/ and common/, named as a
subpackage of `hyrun` (pyproject.toml maps hyrun.runtime -> runtime/ and so on)."""

from setuptools import find_packages, setup

TOP_FOLDERS = ("runtime", "agent", "planner", "proto", "common")

packages = []
for folder in TOP_FOLDERS:
    packages.append(f"hyrun.{folder}")
    packages += [f"hyrun.{folder}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_data={"hyrun.proto": ["*.proto"]})
