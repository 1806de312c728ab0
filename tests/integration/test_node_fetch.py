"""Each node fetches for itself: two Ray nodes of a real multi-node cluster, each with its own
cache folder (as each Ray pod has its own emptyDir), load the same S3 model from a real S3
server (moto). Each fetches it once into its own cache, with no shared volume and nothing in
the operator's; a second model with the same digest on a node is not fetched again, nor is an
unpinned object whose version the node has seen."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelloader.ray_workers import RayWorkers
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader_workers.fetching import SourcePolicy, SourceRequest
from modelloader_workers.worker import NODE_CACHE_ENV

from tests.conftest import EXAMPLE
from tests.integration.conftest import Nodes
from tests.support.calls import identity
from tests.support.object_stores import S3, s3_server

DATA = (EXAMPLE / "digits.tflite").read_bytes()
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def s3() -> Iterator[S3]:
    with s3_server() as server:
        server.put("models", "digits.tflite", DATA)
        server.put("models", "copy.tflite", DATA)  # the same bytes under another name
        yield server


@pytest.fixture
def two_nodes(ray_cluster: Nodes, tmp_path: Path) -> Iterator[dict[str, tuple[str, Path]]]:
    """Nodes a and b, each with its own cache folder; the node id and the folder of each."""
    added = {}
    for name in ("a", "b"):
        cache = tmp_path / f"node-{name}"
        os.environ[NODE_CACHE_ENV] = str(cache)  # the node's processes inherit it
        try:
            node = ray_cluster.cluster.add_node(num_cpus=1, resources={f"fetch-{name}": 10})
        finally:
            del os.environ[NODE_CACHE_ENV]
        added[name] = (node, cache)
    ray_cluster.cluster.wait_for_nodes()
    yield {name: (node.node_id, cache) for name, (node, cache) in added.items()}
    for node, _ in added.values():
        ray_cluster.cluster.remove_node(node)


def model(name: str) -> LoadedModel:
    return LoadedModel("default", name, LoadedModelSpec("default", Source("s3://models/x")))


def test_two_nodes_each_fetch_once_into_their_own_caches(
    two_nodes: dict[str, tuple[str, Path]], s3: S3, tmp_path: Path
) -> None:
    operator_cache = tmp_path / "operator-cache"
    workers = RayWorkers(
        Path(f"/tmp/mlnf-{os.getpid()}"),
        sources=SourcePolicy(roots=(), cache_dir=operator_cache, allow_hosts=("127.0.0.1",)),
    )
    source = SourceRequest("s3://models/digits.tflite", DIGEST, credentials=s3.credentials())

    async def scenario() -> None:
        started = []
        for name, node in (("first", "a"), ("second", "b"), ("again", "a")):
            m = model(name)
            started.append(
                await workers.start(identity(m), m, source, "cpu", {f"fetch-{node}": 1.0})
            )
        (_, first), (_, second), (_, again) = started
        assert first.placement.node_id == two_nodes["a"][0]
        assert second.placement.node_id == two_nodes["b"][0]
        assert again.placement.node_id == two_nodes["a"][0]
        assert first.model is not None and second.model is not None and again.model is not None
        # Each node moved the bytes once; the second model on node a found them there.
        assert first.model.transferred and second.model.transferred
        assert not again.model.transferred
        for _, cache in two_nodes.values():
            assert (cache / "sha256" / f"{DIGEST}.tflite").read_bytes() == DATA
        assert first.model.path.parent.parent == two_nodes["a"][1]
        assert second.model.path.parent.parent == two_nodes["b"][1]
        assert not operator_cache.exists()  # the operator's own disk holds nothing
        # Unpinned: the first fetch on a node learns the object's version (its ETag) and digest;
        # the next load of the same version there moves no bytes.
        unpinned = SourceRequest("s3://models/copy.tflite", credentials=s3.credentials())
        for name in ("unpinned", "unpinned-again"):
            m = model(name)
            started.append(await workers.start(identity(m), m, unpinned, "cpu", {"fetch-b": 1.0}))
        (_, learnt), (_, known) = started[-2:]
        assert learnt.model is not None and known.model is not None
        assert learnt.model.transferred and not known.model.transferred
        assert known.model.sha256 == DIGEST
        for handle, _ in started:
            workers.stop(handle)

    asyncio.run(scenario())
