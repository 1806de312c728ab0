"""Short garbage-collector pauses in the processes on the data path.

A full collection walks every object the process holds. Measured here in a `modelloader local`
process (Ray's driver, kopf, the control plane: about 100,000 objects), one took 87 ms, time
in which the gateway answers nobody; after `gc.freeze()` it took 0.01 ms. Python runs a full
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
