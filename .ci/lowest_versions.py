"""Print `name==floor` for the named dependencies of pyproject.toml: the lowest versions its
pins allow, which .ci/run installs for its second leg. A dependency without a `>=` floor is an
error, so a pin cannot drift out of what CI tests."""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
requirements = {Requirement(line).name: Requirement(line) for line in pyproject["project"]["dependencies"]}
for name in sys.argv[1:]:
    floors = [spec.version for spec in requirements[name].specifier if spec.operator == ">="]
    if len(floors) != 1:
        sys.exit(f"{name}: pyproject.toml has no single '>=' floor to test ({requirements[name]})")
    print(f"{name}=={floors[0]}")
