#!/usr/bin/env python3
"""Writes docs/api.md, the API reference, from the comments in proto/forkd/v1.

The protos are compiled with grpcio-tools into a descriptor set that keeps
source info (the comments) and the google.api.http options, so the
reference is built from what protoc understood rather than from a hand
parse of the .proto text.

    scripts/gen-docs.py            rewrite docs/api.md
    scripts/gen-docs.py --check    exit 1 when docs/api.md is stale

Needs grpcio-tools (the venv from scripts/test-clients.sh has it).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
OUT = ROOT / "docs" / "api.md"
FILES = ["forkd/v1/common.proto", "forkd/v1/snapshot.proto", "forkd/v1/sandbox.proto",
         "forkd/v1/workspace.proto", "forkd/v1/system.proto", "forkd/v1/image.proto"]
PACKAGE = "forkd.v1"

# The generated google.api modules register the http option as an extension,
# so MethodOptions parsed below expose it.
sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))

from google.protobuf import descriptor_pb2  # noqa: E402
from grpc_tools import protoc  # noqa: E402

from forkd._gen.google.api import annotations_pb2  # noqa: E402

FDP = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    FDP.TYPE_DOUBLE: "double", FDP.TYPE_FLOAT: "float", FDP.TYPE_INT64: "int64", FDP.TYPE_UINT64: "uint64",
    FDP.TYPE_INT32: "int32", FDP.TYPE_FIXED64: "fixed64", FDP.TYPE_FIXED32: "fixed32", FDP.TYPE_BOOL: "bool",
    FDP.TYPE_STRING: "string", FDP.TYPE_BYTES: "bytes", FDP.TYPE_UINT32: "uint32", FDP.TYPE_SFIXED32: "sfixed32",
    FDP.TYPE_SFIXED64: "sfixed64", FDP.TYPE_SINT32: "sint32", FDP.TYPE_SINT64: "sint64",
}
# JSON types of the REST transcoding (64-bit integers are numbers, bytes base64).
JSON = {
    "double": "number", "float": "number", "int64": "number", "uint64": "number", "int32": "number",
    "uint32": "number", "fixed64": "number", "fixed32": "number", "sfixed32": "number", "sfixed64": "number",
    "sint32": "number", "sint64": "number", "bool": "boolean", "string": "string", "bytes": "string (base64)",
}


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.pb"
        # protoc.main, unlike `python -m grpc_tools.protoc`, does not add the
        # bundled well-known protos (google/protobuf/descriptor.proto).
        well_known = Path(protoc.__file__).parent / "_proto"
        args = ["protoc", f"-I{PROTO}", f"-I{well_known}", f"--descriptor_set_out={out}", "--include_source_info", "--include_imports", *FILES]
        if protoc.main(args) != 0:
            raise SystemExit("gen-docs.py: protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class Comments:
    """Comments of one file, by SourceCodeInfo path."""

    def __init__(self, f: descriptor_pb2.FileDescriptorProto) -> None:
        self.by_path: Dict[tuple, str] = {}
        for loc in f.source_code_info.location:
            text = (loc.leading_comments or loc.trailing_comments).strip("\n")
            if text:
                self.by_path[tuple(loc.path)] = clean(text)

    def get(self, *path: int) -> str:
        return self.by_path.get(tuple(path), "")


def clean(text: str) -> str:
    lines = [ln[1:] if ln.startswith(" ") else ln for ln in text.splitlines()]
    return "\n".join(lines).strip()


def one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def anchor(full_name: str) -> str:
    return full_name.lower().replace(".", "")


def short(type_name: str) -> str:
    name = type_name.lstrip(".")
    return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else name


def type_link(type_name: str) -> str:
    name = type_name.lstrip(".")
    if name.startswith(PACKAGE + "."):
        return f"[{short(name)}](#{anchor(name)})"
    return f"`{name}`"


def field_type(f: FDP, maps: Dict[str, descriptor_pb2.DescriptorProto]) -> str:
    if f.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
        entry = maps.get(f.type_name.lstrip("."))
        if entry is not None:
            k, v = entry.field[0], entry.field[1]
            return f"map<{field_type(k, maps)}, {field_type(v, maps)}>"
        base = type_link(f.type_name)
    else:
        base = SCALARS[f.type]
    if f.label == FDP.LABEL_REPEATED:
        return f"repeated {base}"
    if f.proto3_optional:
        return f"optional {base}"
    return base


def http_rule(m: descriptor_pb2.MethodDescriptorProto) -> List[str]:
    if not m.options.HasExtension(annotations_pb2.http):
        return []
    rules = [m.options.Extensions[annotations_pb2.http]]
    rules += list(rules[0].additional_bindings)
    out = []
    for r in rules:
        verb = r.WhichOneof("pattern")
        if verb is None or verb == "custom":
            continue
        out.append(f"{verb.upper()} {getattr(r, verb)}")
    return out


def render(fds: descriptor_pb2.FileDescriptorSet) -> str:
    files = {f.name: f for f in fds.file}
    maps: Dict[str, descriptor_pb2.DescriptorProto] = {}
    for f in fds.file:
        for msg in f.message_type:
            for nested in msg.nested_type:
                if nested.options.map_entry:
                    maps[f"{f.package}.{msg.name}.{nested.name}"] = nested

    out: List[str] = []
    w = out.append
    w("# forkd API reference")
    w("")
    w("<!-- Generated from proto/forkd/v1 by scripts/gen-docs.py; edit the proto comments, not this file. -->")
    w("")
    w("forkd is driven over gRPC (package `forkd.v1`) and over REST, transcoded from the same")
    w("protos by the `google.api.http` rules shown with each method; [rest.md](rest.md) shows")
    w("the REST side with examples. All calls need `authorization: Bearer <token>` when the")
    w("daemon has a token; errors are gRPC status codes (REST: `{\"error\", \"code\"}`).")
    w("")
    w("## Services")
    w("")
    services = [(files[name], s_i, s) for name in FILES for s_i, s in enumerate(files[name].service)]
    for f, _, s in services:
        w(f"- [{f.package}.{s.name}](#{anchor(f.package + '.' + s.name)})")
    w("")

    for f, s_i, s in services:
        com = Comments(f)
        w(f"### {f.package}.{s.name}")
        w("")
        w(f"Defined in `proto/{f.name}`.")
        w("")
        doc = com.get(6, s_i)
        if doc:
            w(doc)
            w("")
        w("| method | request | response | REST |")
        w("|---|---|---|---|")
        for m_i, m in enumerate(s.method):
            req = ("stream " if m.client_streaming else "") + type_link(m.input_type)
            resp = ("stream " if m.server_streaming else "") + type_link(m.output_type)
            rest = "<br>".join(f"`{r}`" for r in http_rule(m)) or "—"
            w(f"| [{m.name}](#{anchor(f.package + '.' + s.name + '.' + m.name)}) | {req} | {resp} | {rest} |")
        w("")
        for m_i, m in enumerate(s.method):
            w(f"#### {s.name}.{m.name}")
            w(f'<a id="{anchor(f.package + "." + s.name + "." + m.name)}"></a>')
            w("")
            req = ("stream " if m.client_streaming else "") + type_link(m.input_type)
            resp = ("stream " if m.server_streaming else "") + type_link(m.output_type)
            w(f"`rpc {m.name}` ({req}) returns ({resp})")
            w("")
            for r in http_rule(m):
                w(f"- REST: `{r}`")
            if http_rule(m):
                w("")
            doc = com.get(6, s_i, 2, m_i)
            if doc:
                w(doc)
                w("")

    w("## Messages")
    w("")
    for name in FILES:
        f = files[name]
        com = Comments(f)
        for m_i, msg in enumerate(f.message_type):
            full = f"{f.package}.{msg.name}"
            w(f"### {msg.name}")
            w(f'<a id="{anchor(full)}"></a>')
            w("")
            w(f"Defined in `proto/{f.name}`.")
            w("")
            doc = com.get(4, m_i)
            if doc:
                w(doc)
                w("")
            if not msg.field:
                w("No fields.")
                w("")
                continue
            oneofs = {i: o.name for i, o in enumerate(msg.oneof_decl)}
            w("| field | number | type | JSON | description |")
            w("|---|---|---|---|---|")
            for f_i, fld in enumerate(msg.field):
                t = field_type(fld, maps)
                if fld.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
                    js = "object" if fld.type_name.lstrip(".") in maps or fld.type == FDP.TYPE_MESSAGE else "string"
                else:
                    js = JSON[SCALARS[fld.type]]
                if fld.label == FDP.LABEL_REPEATED and fld.type_name.lstrip(".") not in maps:
                    js = f"array of {js}"
                desc = one_line(com.get(4, m_i, 2, f_i))
                if fld.HasField("oneof_index") and not fld.proto3_optional:
                    desc = (f"One of `{oneofs[fld.oneof_index]}`. " + desc).strip()
                w(f"| `{fld.name}` | {fld.number} | {t} | {js} | {desc} |")
            w("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail when docs/api.md is stale")
    args = ap.parse_args(argv)
    text = render(descriptor_set())
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "docs/api.md", "generated", lineterm="", n=1)
            print("\n".join(list(diff)[:40]))
            print("gen-docs.py: docs/api.md is stale; run scripts/gen-docs.py", file=sys.stderr)
            return 1
        print("gen-docs.py: docs/api.md is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"gen-docs.py: wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
