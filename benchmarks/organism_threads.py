"""Seconds per training step of the model organism with 1 and with 2 torch threads, on an idle
machine and under load (busy processes started beside it), so the default thread count is chosen
on figures: a shared 2-core machine is often loaded, and 2 threads then stall on each other.

    python benchmarks/organism_threads.py                   # 1 vs 2 threads, with 0 and 1 busy processes
    python benchmarks/organism_threads.py --steps 40 --loads 0 1 2

Prints one JSON line per (load, threads) and a summary; the 5-minute build time in the docs is
steps x the 1-thread idle figure plus the evaluation. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics


def _busy(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _time_steps(steps: int, threads: int, repeats: int) -> list[float]:
    from loopalign.organism import OrganismConfig, train_organism

    times = []
    for _ in range(repeats):
        cfg = OrganismConfig(steps=steps, warmup_steps=0, num_threads=threads, eval_problems=1)
        result = train_organism(cfg, progress=False)
        times.append(result.seconds / steps)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="training steps timed per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (the median is reported)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1], help="busy processes running beside")
    args = ap.parse_args(argv)
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    summary = {}
    for load in args.loads:
        stop = mp.Event()
        workers = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(load)]
        for w in workers:
            w.start()
        try:
            for threads in args.threads:
                times = _time_steps(args.steps, threads, args.repeats)
                row = {
                    "busy_processes": load,
                    "threads": threads,
                    "seconds_per_step": round(statistics.median(times), 4),
                    "runs": [round(t, 4) for t in times],
                    "load_average": round(os.getloadavg()[0], 2),
                }
                summary[(load, threads)] = row["seconds_per_step"]
                print(json.dumps(row), flush=True)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=10)
    for load in args.loads:
        cells = ", ".join(f"{t} thread(s) {summary[(load, t)]:.3f} s/step" for t in args.threads)
        print(f"{load} busy process(es): {cells}")


if __name__ == "__main__":
    main()
