"""NucleusDetection: nuclei of a slide -> DSA annotation (+ CSV, GeoJSON, overlay)."""

import time

from nucleus_models.cli_support import run_cli
from nucleus_models.detection import DetectionParams

#: The parameter object; its fields are this CLI's XML parameter names.
Params = DetectionParams
#: the share of the progress bar the tiles fill; writing the outputs, the rest
TILES_SHARE = 0.95


def main(args):
    from nucleus_models.detection import detect_nuclei, summary_line, write_outputs
    from nucleus_models.progress import FilterProgress

    params = Params.from_namespace(args)
    progress = FilterProgress("NucleusDetection", f"model {params.model}")
    progress.start()
    t0 = time.perf_counter()
    # the tiles up to 0.95, the outputs the rest (a million nuclei: ~45 s)
    result = detect_nuclei(
        params, progress=lambda done: progress(TILES_SHARE * done), note=progress.note
    )
    written = write_outputs(result)
    progress(1.0)
    print(summary_line(result, written), flush=True)
    progress.end(time.perf_counter() - t0)


if __name__ == "__main__":
    run_cli(main, __file__)
