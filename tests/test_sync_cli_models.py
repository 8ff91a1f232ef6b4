"""scripts/sync_cli_models.py: the CLIs' model menus follow the registry."""

from __future__ import annotations

import difflib
import doctest
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(
        "sync_cli_models", REPO / "scripts" / "sync_cli_models.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docstring_examples() -> None:
    result = doctest.testmod(_script())
    assert result.attempted > 0 and result.failed == 0


def test_shipped_menus_are_in_sync(capsys) -> None:
    assert _script().main(["--check"]) == 0
    assert capsys.readouterr().out == ""


def test_a_new_model_joins_every_menu_as_ctk_reads_it(tmp_path: Path) -> None:
    from ctk_cli import CLIModule
    from slicer_cli_web import CLIArgumentParser  # noqa: F401  (slicer_cli_web's ctk_cli tweaks)

    mod = _script()
    models = mod.registered()
    models["unet-mysite"] = "H&E <site> model, fine-tuned on 12 fields."
    for path in mod.cli_xmls():
        text = path.read_text()
        new, added, removed = mod.sync_xml(text, models)
        assert (added, removed) == (["unet-mysite"], [])
        out = tmp_path / path.name
        out.write_text(new)
        before = {p.name: p for p in CLIModule(str(path)).parameters()}["model"]
        model = {p.name: p for p in CLIModule(str(out)).parameters()}["model"]
        assert list(model.elements) == [*before.elements, "unet-mysite"]
        assert model.default == "unet-monuseg"
        assert "unet-mysite: H&E <site> model, fine-tuned on 12 fields." in model.description
        # nothing else in the file changed: one description rewritten, one element added
        diff = [
            ln
            for ln in difflib.ndiff(text.splitlines(), new.splitlines())
            if ln[:2] in ("- ", "+ ")
        ]
        assert len(diff) == 3 and "<element>unet-mysite</element>" in diff[-1]
        assert "<description>Nucleus model" in diff[0] and "unet-mysite" in diff[1]
        # and back: a model no longer registered leaves the menu
        back, added, removed = mod.sync_xml(new, mod.registered())
        assert (added, removed) == ([], ["unet-mysite"])
        assert back == text  # its element and its sentence gone, nothing else touched
        # between other added models, only its own sentence goes
        two = {**models, "unet-other": "IHC: Ki-67 fields."}
        both = mod.sync_xml(text, two)[0]
        one = mod.sync_xml(both, {k: v for k, v in two.items() if k != "unet-mysite"})[0]
        assert one == mod.sync_xml(text, {**mod.registered(), "unet-other": two["unet-other"]})[0]


def test_a_default_that_left_the_registry_is_an_error() -> None:
    mod = _script()
    path = mod.cli_xmls()[0]
    models = {k: v for k, v in mod.registered().items() if k != "unet-monuseg"}
    with pytest.raises(ValueError, match="default 'unet-monuseg' is no longer registered"):
        mod.sync_xml(path.read_text(), models)
