"""Print every organism in a cache folder (CI: one per CPU kernel path) with its build fingerprint and the
figures of its model card at the trained depth: `python .ci/organisms.py CACHE_DIR`."""

import json
import sys
from pathlib import Path

for marker in sorted(Path(sys.argv[1]).glob("organism-v*/organism.json")):
    meta = json.loads(marker.read_text())
    b = meta.get("build") or {}
    depth = meta["config"]["num_loops"]
    row = next((r for r in meta["eval"]["table"] if r["loop"] == depth), meta["eval"]["table"][-1])
    print(
        f"  {marker.parent.name}: CPU capability {b.get('cpu_capability')}, MKL {b.get('mkl_instructions')}, "
        f"torch {b.get('torch')}, {b.get('threads')} thread(s): loop {row['loop']} SV {100 * row['sv']:.1f}, RR {100 * row['rr']:.1f}, "
        f"gap {100 * row['gap']:+.1f} [{100 * row['gap_lo']:+.1f}, {100 * row['gap_hi']:+.1f}]"
    )
