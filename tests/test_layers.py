"""The package listing is the architecture: each layer imports only the layers below it (or itself), lazy
imports inside functions included, so that no upper-floor module is reached from a lower one."""

import ast
import pathlib

import jaxlm

LAYERS = ["core", "model", "data", "hf", "training", "inference", "serving", "evaluation", "conversion", "planning",
          "commands", "cli"]


def _layer(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "jaxlm"
    if len(parts) == 1 or parts[1] == "configs":  # the package root and the presets sit at the bottom
        return -1
    assert parts[1] in LAYERS, f"jaxlm.{parts[1]} is not placed in a layer: add it to LAYERS"
    return LAYERS.index(parts[1])


def test_every_import_points_down_the_layers():
    root = pathlib.Path(jaxlm.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("jaxlm", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        if ".configs" in module:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("jaxlm.") and _layer(name) > _layer(module):
                    upward.append(f"{module}:{node.lineno} imports {name}")
    assert not upward, "\n".join(upward)
