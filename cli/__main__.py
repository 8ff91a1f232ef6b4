"""``python -m cli --list_cli`` / ``python -m cli <Name> --xml`` / ``python -m cli <Name> ARGS``.

The Docker image's entrypoint: slicer_cli_web's list entrypoint over this
folder and the top-level ``slicer_cli_list.json``, except that a CLI replaces
this process (``exec``) instead of running as its child.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))


def main() -> None:
    spec = os.environ.get("SLICER_CLI_LIST") or os.path.join(
        os.path.dirname(HERE), "slicer_cli_list.json"
    )
    with open(spec) as f:
        clis = json.load(f)
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if clis.get(name, {}).get("type") == "python":
        # the CLI takes this process's place (slicer_cli_web's entrypoint runs
        # it as a child): it is then the container's first process and gets
        # the SIGTERM of a cancelled job itself, so it can clean up
        script = os.path.join(HERE, name, f"{name}.py")
        os.execv(sys.executable, [sys.executable, script, *sys.argv[2:]])
    from slicer_cli_web.cli_list_entrypoint import CLIListEntrypoint

    sys.exit(CLIListEntrypoint(cli_list_spec_file=spec, cwd=HERE))


if __name__ == "__main__":
    main()
