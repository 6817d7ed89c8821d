"""What a heatmap costs: seconds per image of ``pneumo-edge explain`` (occlusion through a
runtime, and Grad-CAM through torch when model.pt and torch are there), on real image files.

Occlusion runs the model once per patch position (15 x 15 = 225 at the default patch of an
eighth of the image, moved by half a patch) plus once unoccluded, in batches of ``--batch``;
so its cost is about 226 single-image inferences. Each image is timed end to end (the map only:
decoding and the picture are not included), after one untimed warm-up image.

    .venv/bin/python benchmarks/explain_cost.py --model runs/final \
        --data samples/chest_xray/train --limit 4

Prints a JSON object with the machine (CPU, cores, load average before and after) next to the
figures. On a shared machine the figures are high: say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a folder of image files (walked as score)")
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--limit", type=int, default=4, help="images timed per method")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-gradcam", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from pneumo_edge.commands.bench import cpu_summary, machine_info
    from pneumo_edge.explain.methods import Explainer, default_patch, positions
    from pneumo_edge.inputs.folders import walk_images
    from pneumo_edge.inputs.images import load_image
    from pneumo_edge.runtimes import open_runtime

    before = machine_info()
    files = walk_images([args.data]).files[:args.limit + 1]
    result = {"machine": cpu_summary(before), "load_avg_before": before["load_avg_1_5_15"],
              "date": before["date"], "versions": before["versions"], "rows": []}
    methods = [("occlusion", args.runtime)]
    if not args.no_gradcam:
        methods.append(("gradcam", "torch"))
    for method, runtime in methods:
        try:
            rt = open_runtime(args.model, runtime, log=lambda m: None)
        except Exception as exc:  # noqa: BLE001 -- report and go on with the other method
            result["rows"].append({"method": method, "runtime": runtime, "skipped": str(exc)})
            continue
        ex = Explainer(rt, method, batch=args.batch)
        size = rt.card.image_size
        pixels = [load_image(f, size) for f in files]
        ex(pixels[0])  # warm-up
        times = []
        for px in pixels[1:]:
            t0 = time.perf_counter()
            ex(px)
            times.append(time.perf_counter() - t0)
        patch, stride = default_patch(size)
        row = {"method": method, "runtime": rt.name, "file": str(rt.path), "image_size": size,
               "arch": rt.card.arch, "images": len(times),
               "s_per_image_median": round(statistics.median(times), 3),
               "s_per_image_max": round(max(times), 3)}
        if method == "occlusion":
            row["model_calls_per_image"] = len(positions(size, patch, stride)) ** 2 + 1
            row["patch"], row["stride"], row["batch"] = patch, stride, args.batch
        result["rows"].append(row)
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
