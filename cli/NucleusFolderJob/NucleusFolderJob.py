"""NucleusFolderJob: run an analysis on every large image of a Girder folder.

Pushes one annotation per slide and analysis (replacing the previous one),
writes scores and provenance to item metadata, skips slides already done with
the same parameters, and uploads a summary CSV to the folder. Exits with
status 1 (one ``error:`` line) when any slide failed, after the others' results
and the summary are saved, so that HistomicsUI shows the job as failed.
"""

import logging
import os
import time

from nucleus_models.cli_support import fail, run_cli
from nucleus_models.dsa.folder_job import FolderJobParams, summary_name

#: The parameter object; its fields are this CLI's XML parameter names.
Params = FolderJobParams


def main(args):
    from nucleus_models.dsa import connect, install_log_redaction, run_folder_job
    from nucleus_models.progress import FilterProgress

    install_log_redaction()
    if not os.environ.get("NUCLEUS_LOG_LEVEL"):
        # the job log (HistomicsUI shows it) says what became of each slide and
        # the totals, as the cron command does, not only warnings and progress
        logging.getLogger("nucleus_models.dsa").setLevel(logging.INFO)
    params = Params.from_namespace(args)
    params.check()  # before connecting
    progress = FilterProgress("NucleusFolderJob", f"{params.analysis} with model {params.model}")
    progress.start()
    t0 = time.perf_counter()
    client = connect(params.girderApiUrl, params.girderToken or None)
    outcomes = run_folder_job(client, params, progress=progress)
    progress.end(time.perf_counter() - t0)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:  # the job shows as failed in HistomicsUI; a re-run redoes only these
        analysed = sum(o.status != "not_analysed" for o in outcomes)
        first = f"{failed[0].item_name}: {failed[0].error}"
        fail(
            f"{len(failed)} of {analysed} slide(s) failed (first: {first[:300]}); the others'"
            f" results are saved; the list is in {summary_name(params.key())}",
            code=1,
        )


if __name__ == "__main__":
    run_cli(main, __file__)
