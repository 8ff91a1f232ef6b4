"""NucleusDetection: nuclei of a slide -> DSA annotation (+ CSV, GeoJSON, overlay)."""

import time

from nucleus_models.cli_support import run_cli
from nucleus_models.detection import DetectionParams

#: The parameter object; its fields are this CLI's XML parameter names.
Params = DetectionParams


def main(args):
    from nucleus_models.detection import detect_nuclei, summary_line, write_outputs
    from nucleus_models.progress import FilterProgress

    params = Params.from_namespace(args)
    progress = FilterProgress("NucleusDetection", f"model {params.model}")
    progress.start()
    t0 = time.perf_counter()
    result = detect_nuclei(params, progress=progress)
    written = write_outputs(result)
    print(summary_line(result, written), flush=True)
    progress.end(time.perf_counter() - t0)


if __name__ == "__main__":
    run_cli(main, __file__)
