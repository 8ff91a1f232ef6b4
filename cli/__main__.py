"""``python -m cli --list_cli`` / ``python -m cli <Name> --xml`` / ``python -m cli <Name> ARGS``.

The Docker image's entrypoint: slicer_cli_web's list entrypoint over this
folder and the top-level ``slicer_cli_list.json``.
"""

import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))


def main() -> None:
    from slicer_cli_web.cli_list_entrypoint import CLIListEntrypoint

    spec = os.environ.get("SLICER_CLI_LIST") or os.path.join(
        os.path.dirname(HERE), "slicer_cli_list.json"
    )
    sys.exit(CLIListEntrypoint(cli_list_spec_file=spec, cwd=HERE))


if __name__ == "__main__":
    main()
