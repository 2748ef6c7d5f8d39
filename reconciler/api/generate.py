"""Generates the read API's Python modules from reconciler/api/proto/diode/v1/reconciler.proto.

    python -m reconciler.api.generate          # rewrite reconciler_pb2.py, .pyi and _grpc.py
    python -m reconciler.api.generate --check  # exit 1 when they differ from what the .proto gives

The .proto imports the SDK's diode/v1/ingester.proto, which the SDK ships only as generated Python.
protoc is handed the SDK's own descriptor of that file (and of what it imports) as a descriptor set,
so the schema is never copied. protoc's imports are then pointed at the modules that exist here: the
SDK's ingester_pb2 and our reconciler_pb2. The output depends only on the .proto, the SDK and the
grpcio-tools version, which setup.cfg pins for that reason (tests/test_api.py compares them).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE / "proto"
PROTO = "diode/v1/reconciler.proto"
GENERATED = ("reconciler_pb2.py", "reconciler_pb2.pyi", "reconciler_pb2_grpc.py")
IMPORTS = {  # protoc's import line -> the module it means here
    "from diode.v1 import ingester_pb2": "from netboxlabs.diode.sdk.diode.v1 import ingester_pb2",
    "from diode.v1 import reconciler_pb2": "from reconciler.api import reconciler_pb2",
}


def sdk_descriptor_set() -> bytes:
    """The SDK's ingester.proto and everything it imports, as a serialized FileDescriptorSet."""
    from netboxlabs.diode.sdk.diode.v1 import ingester_pb2

    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(file: FileDescriptor) -> None:
        if file.name in files:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        files[file.name] = proto

    add(ingester_pb2.DESCRIPTOR)
    return descriptor_pb2.FileDescriptorSet(file=list(files.values())).SerializeToString()


def generate(out: Path) -> None:
    """Run protoc and write the three modules, imports rewritten, into `out`."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        descriptors = Path(scratch) / "sdk.pb"
        descriptors.write_bytes(sdk_descriptor_set())
        code = protoc.main(["protoc", f"--descriptor_set_in={descriptors}", f"-I{PROTO_ROOT}",
                            f"--python_out={scratch}", f"--pyi_out={scratch}", f"--grpc_python_out={scratch}", PROTO])
        if code != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / PROTO} (exit {code})")
        for name in GENERATED:
            text = (Path(scratch) / "diode/v1" / name).read_text("utf-8")
            for line, replacement in IMPORTS.items():
                text = text.replace(line, replacement)
            (out / name).write_text(text, "utf-8")


def stale(target: Path = HERE) -> list[str]:
    """The generated modules in `target` that differ from what the .proto gives now."""
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        return [name for name in GENERATED
                if not (target / name).exists() or not filecmp.cmp(Path(fresh) / name, target / name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.api.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a module is out of date")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        for name in out_of_date:
            print(f"reconciler/api/{name} does not match {PROTO}: run python -m reconciler.api.generate",
                  file=sys.stderr)
        return 1 if out_of_date else 0
    generate(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
