"""Generate the gateway's gRPC code from its .proto files (grpcio-tools), next to them.

    .venv/bin/python tools/make_protos.py          # write
    .venv/bin/python tools/make_protos.py --check  # exit 1 if the committed code differs

The generated modules import each other as `modelloader_gateway.protos.*`, and
`tests/unit/test_grpc_protos.py` fails when they are stale.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent.parent / "workers" / "modelloader_gateway" / "protos"
PACKAGE = "modelloader_gateway.protos"


def generate(into: Path) -> dict[str, str]:
    """Every generated module's text, by file name."""
    for proto in sorted(PROTOS.glob("*.proto")):
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTOS}",
                f"--python_out={into}",
                f"--pyi_out={into}",
                f"--grpc_python_out={into}",
                str(proto),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto.name}")
    out = {}
    for path in sorted(into.glob("*_pb2*.py*")):
        text = path.read_text()
        # Absolute imports of the sibling modules: the generator writes `import x_pb2`.
        text = re.sub(r"^import (\w+_pb2) as", rf"from {PACKAGE} import \1 as", text, flags=re.M)
        # The package's own descriptor pool, not the process-wide default (see __init__.py).
        text = text.replace(
            "from google.protobuf import descriptor_pool as _descriptor_pool\n",
            "from google.protobuf import descriptor_pool as _descriptor_pool\n"
            f"from {PACKAGE} import POOL as _POOL\n",
        ).replace("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile(")
        out[path.name] = text
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        made = generate(Path(scratch))
    if args.check:
        stale = [
            name
            for name, text in made.items()
            if not (PROTOS / name).exists() or (PROTOS / name).read_text() != text
        ]
        for name in stale:
            print(f"{PROTOS / name} is stale: run tools/make_protos.py", file=sys.stderr)
        return 1 if stale else 0
    for name, text in made.items():
        (PROTOS / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
