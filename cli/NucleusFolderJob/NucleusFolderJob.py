"""NucleusFolderJob: run an analysis on every large image of a Girder folder.

Pushes one annotation per slide and analysis (replacing the previous one),
writes scores and provenance to item metadata, skips slides already done with
the same parameters, and uploads a summary CSV to the folder.
"""

import time

from nucleus_models.cli_support import run_cli
from nucleus_models.dsa.folder_job import FolderJobParams

#: The parameter object; its fields are this CLI's XML parameter names.
Params = FolderJobParams


def main(args):
    from nucleus_models.dsa import connect, install_log_redaction, run_folder_job
    from nucleus_models.progress import FilterProgress

    install_log_redaction()
    params = Params.from_namespace(args)
    progress = FilterProgress("NucleusFolderJob", f"{params.analysis} with model {params.model}")
    progress.start()
    t0 = time.perf_counter()
    client = connect(params.girderApiUrl, params.girderToken or None)
    run_folder_job(client, params, progress=progress)
    progress.end(time.perf_counter() - t0)


if __name__ == "__main__":
    run_cli(main, __file__)
