"""Where a loaded model runs, as its worker reports it; shown in the LoadedModel's status and,
where an origin's policy allows, in the model's metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Placement:
    node: str  # the host name
    node_id: str  # the Ray node
    accelerator: str  # what runs it: cpu (also after a fallback), gpu or npu
    delegate: str
    pid: int
    sandbox: str = ""  # what confines the model's threads ("": nothing)
    delegated_ops_share: float | None = None
    precision: str = "fp32"  # what the kernels compute in (spec.precision, where it took)

    def to_dict(self) -> dict[str, Any]:
        """The resource's camelCase shape."""
        shown: dict[str, Any] = {
            "node": self.node,
            "nodeId": self.node_id,
            "accelerator": self.accelerator,
            "delegate": self.delegate,
            "pid": self.pid,
            "precision": self.precision,
        }
        if self.sandbox:
            shown["sandbox"] = self.sandbox
        if self.delegated_ops_share is not None:
            shown["delegatedOpsShare"] = self.delegated_ops_share
        return shown
