"""Regenerate the Python modules of the wire contract: `python proto/generate.py`.

The modules sit next to teacher.proto (proto/opd/v1/) and are imported as
`opd.v1.teacher_pb2`. `--check` regenerates into a temporary folder and exits 1
when the committed modules differ (tests/test_proto.py runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "opd/v1/teacher.proto"
GENERATED = ["opd/v1/teacher_pb2.py", "opd/v1/teacher_pb2.pyi", "opd/v1/teacher_pb2_grpc.py"]


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def stale_modules() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            name
            for name in GENERATED
            if not (PROTO_ROOT / name).exists() or not filecmp.cmp(Path(tmp) / name, PROTO_ROOT / name, shallow=False)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the generated modules are stale")
    if parser.parse_args().check:
        stale = stale_modules()
        if stale:
            print("stale generated modules (run python proto/generate.py):", *stale, file=sys.stderr)
            sys.exit(1)
        print("generated modules are up to date")
    else:
        generate(PROTO_ROOT)


if __name__ == "__main__":
    main()
