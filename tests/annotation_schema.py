"""large_image's own annotation schema, read from girder-large-image-annotation.

The package imports Girder at module level, so instead of importing it we
read its ``models/annotation.py`` and execute only ``extendSchema`` and the
``AnnotationSchema`` class (pure dicts), exactly as the server defines them.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def annotation_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("girder_large_image_annotation")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "girder-large-image-annotation is not installed (scripts/install.sh installs it with EXTRAS=dev)"
        )
    src_path = Path(next(iter(spec.submodule_search_locations))) / "models" / "annotation.py"
    tree = ast.parse(src_path.read_text())
    keep = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name == "extendSchema")
        or (isinstance(node, ast.ClassDef) and node.name == "AnnotationSchema")
    ]
    if len(keep) != 2:
        raise RuntimeError(f"AnnotationSchema not found in {src_path}")
    ns: dict[str, Any] = {"copy": copy}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(src_path), "exec"), ns)
    return ns["AnnotationSchema"].annotationSchema


def validate_annotation(doc: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``doc`` is not a valid annotation."""
    import jsonschema

    jsonschema.Draft6Validator(annotation_schema()).validate(doc)
