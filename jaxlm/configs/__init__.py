"""Stand-in for the presets package when jaxlm runs from a source checkout.

The presets live in the repository's top-level configs/ folder. setup.py installs that folder as
jaxlm.configs (package_dir), with configs/__init__.py as the package's init, so an installed jaxlm never
reads this file: setup.py does not ship it. From a checkout (PYTHONPATH at the repository root, or an
editable install, whose finder meets this directory first) this file points the package at configs/.
"""

import pathlib

# jaxlm/configs/__init__.py -> the repository root -> configs/
__path__ = [str(pathlib.Path(__file__).resolve().parents[2] / "configs")]
