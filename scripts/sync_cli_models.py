"""Make the CLIs' model menus list the registered models.

HistomicsUI offers a CLI's ``--model`` choices from its XML, which is a
file, while the registry is whatever cards ``nucleus_models/weights`` holds.
After exporting a fine-tuned model there (``nucleus-bench train ...
--export``), run this so NucleusDetection and NucleusFolderJob offer it (then
rebuild the image or build one ``FROM`` it; README, "Serving a model you
trained")::

    python scripts/sync_cli_models.py            # rewrite the XMLs
    python scripts/sync_cli_models.py --check    # exit 1 if they are out of date

The menu keeps its order and default, drops models no longer registered and
appends new ones; each new model's card description is added to the
parameter's description, and a dropped model's sentence is taken out of it.
Only the ``<element>`` lines and that description change: the rest of the
file stays as it is.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_BLOCK = re.compile(
    r"(<string-enumeration>(?:(?!</string-enumeration>).)*?<name>model</name>.*?</string-enumeration>)",
    re.S,
)
_ELEMENT = re.compile(r"^([ \t]*)<element>(.*?)</element>[ \t]*\n", re.M)
_DESCRIPTION = re.compile(r"(<description>)(.*?)(</description>)", re.S)


def sync_xml(text: str, models: Mapping[str, str]) -> tuple[str, list[str], list[str]]:
    """``text`` with its ``model`` enumeration made ``models`` (name ->
    description); returns the new text and the names added and removed.

    >>> xml = '''<string-enumeration>
    ...   <name>model</name>
    ...   <description>a: first.</description>
    ...   <element>a</element>
    ...   <element>gone</element>
    ...   <default>a</default>
    ... </string-enumeration>
    ... '''
    >>> new, added, removed = sync_xml(xml, {"a": "first", "b": "Site & stain."})
    >>> added, removed
    (['b'], ['gone'])
    >>> print(new.strip())  # doctest: +NORMALIZE_WHITESPACE
    <string-enumeration>
      <name>model</name>
      <description>a: first. b: Site &amp; stain.</description>
      <element>a</element>
      <element>b</element>
      <default>a</default>
    </string-enumeration>

    A model that leaves takes its sentence with it:

    >>> back, added, removed = sync_xml(new, {"a": "first"})
    >>> removed, "Site" in back
    (['b'], False)
    """
    match = _BLOCK.search(text)
    if match is None:
        return text, [], []
    block = match.group(1)
    found = list(_ELEMENT.finditer(block))
    if not found:
        raise ValueError("the model enumeration lists no <element>")
    listed = [html.unescape(m.group(2)) for m in found]
    keep = [n for n in listed if n in models]
    added = sorted(n for n in models if n not in listed)
    removed = [n for n in listed if n not in models]
    indent, at = found[0].group(1), found[0].start()
    lines = "".join(f"{indent}<element>{html.escape(n)}</element>\n" for n in keep + added)
    body = _ELEMENT.sub("", block)
    new_block = body[:at] + lines + body[at:]
    if added or removed:

        def describe(m: re.Match[str]) -> str:
            text = m.group(2).rstrip()
            for n in removed:  # its "name: ..." up to the next listed model's or the end
                start = text.rfind(f" {html.escape(n)}: ")
                if start < 0:
                    continue
                ends = [text.find(f" {html.escape(k)}: ", start + 1) for k in keep + added]
                end = min([e for e in ends if e > start], default=len(text))
                text = text[:start] + text[end:]
            extra = "".join(
                f" {html.escape(n)}: {html.escape(models[n].strip().rstrip('.'))}." for n in added
            )
            return f"{m.group(1)}{text}{extra}{m.group(3)}"

        new_block = _DESCRIPTION.sub(describe, new_block, count=1)
    default = re.search(r"<default>(.*?)</default>", new_block)
    if default and html.unescape(default.group(1)) not in models:
        raise ValueError(
            f"the menu's default {default.group(1)!r} is no longer registered: "
            "change <default> by hand"
        )
    return text[: match.start()] + new_block + text[match.end() :], added, removed


def registered() -> dict[str, str]:
    """Registered model names and their descriptions."""
    from nucleus_models.models import get_spec, list_models

    return {n: get_spec(n).description for n in list_models()}


def cli_xmls(repo: Path = REPO) -> list[Path]:
    """The XML of every CLI ``slicer_cli_list.json`` names."""
    names = json.loads((repo / "slicer_cli_list.json").read_text())
    return [repo / "cli" / n / f"{n}.xml" for n in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if out of date")
    args = ap.parse_args(argv)
    models = registered()
    stale = False
    for path in cli_xmls():
        text = path.read_text()
        try:
            new, added, removed = sync_xml(text, models)
        except ValueError as exc:
            print(f"error: {path.name}: {exc}", file=sys.stderr)
            return 2
        if new == text:
            continue
        stale = True
        what = ", ".join([f"+{n}" for n in added] + [f"-{n}" for n in removed])
        if args.check:
            print(f"{path.relative_to(REPO)}: model menu out of date ({what})")
        else:
            path.write_text(new)
            print(f"{path.relative_to(REPO)}: {what}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
