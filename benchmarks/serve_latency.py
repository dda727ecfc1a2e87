"""How soon `dfm serve` shows the first-stage preview: start the server on a run, submit jobs, read the events.

    python benchmarks/serve_latency.py runs/quickstart --repeats 5

Prints, per job, the seconds from the job's start (on the server) to each stage's preview and to the final images,
and the medians. Uses the defaults of the page (4 images, the run's steps) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import urllib.request

from dfm.serve import running_server


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with running_server(args.run, threads=args.threads) as url:
        rows = []
        for i in range(args.repeats + 1):  # the first job warms up
            body = json.dumps({"num_images": args.images, "seeds": list(range(args.images))}).encode()
            req = urllib.request.Request(f"{url}/api/generate", body, {"Content-Type": "application/json"})
            job = json.loads(urllib.request.urlopen(req).read())["job"]
            times, kind = {}, None
            with urllib.request.urlopen(f"{url}/api/jobs/{job}/events") as stream:
                for line in stream:
                    line = line.decode().strip()
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind in ("stage", "done"):
                        d = json.loads(line[6:])
                        times[f"stage {d['stage'] + 1}" if kind == "stage" else "final"] = d["seconds"]
                        if kind == "done":
                            break
            if i:
                rows.append(times)
                print(f"job {i}: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()), flush=True)
        for key in rows[0]:
            print(f"median {key}: {statistics.median(r[key] for r in rows):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
