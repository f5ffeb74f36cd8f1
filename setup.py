"""Packaging glue that pyproject.toml cannot express on its own (all metadata lives there).

The model cards are data in the top-level models/ folder; they ship inside the package as
flowgen/models/*.yaml, so `flowgen.engine.catalog.cards` finds them after a non-editable install too;
the report's template (flowgen/report/*.j2) ships the same way.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["flowgen", "flowgen.*"]) + ["flowgen.models"],
    package_dir={"flowgen.models": "models"},
    package_data={"flowgen.models": ["*.yaml"], "flowgen.report": ["*.j2"]},
)
