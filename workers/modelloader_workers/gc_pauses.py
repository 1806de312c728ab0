"""Short garbage-collector pauses in the processes on the data path.

A full collection walks every object the process holds, and a process that holds Ray's
driver, kopf and the control plane holds many: the gateway answers nobody meanwhile
(bench/RESULTS.md, "What changed, and what each change bought"). Python runs a full
collection rarely (when the objects that survived since the last one reach a quarter of the
rest), so it shows at the 99th percentile and beyond, not at the median.
"""

from __future__ import annotations

import gc


def freeze_long_lived(collect: bool = True) -> None:
    """Leave everything alive now out of future collections: what a process holds once it
    has started (modules, Ray's state, a loaded model) lives as long as the process. Call it
    again after loading more. The cost is that a cycle among these objects that later turns
    to garbage is never freed; startup state does not do that. `collect` first frees what is
    garbage already; skip it where other threads are serving (a collection holds the GIL
    as long as the pause this avoids)."""
    if collect:
        gc.collect()
    gc.freeze()
