"""Generate the protobuf, gRPC and typed-stub code from protos/ into services/pb/ (`make protos`).

    python -m services.protogen [--force]

protoc runs with `protos/` as its include root, so the descriptors keep their source names
(`cpumesh/v1/shard.proto`) and reflection shows the real contract. grpc_tools writes imports as
`from cpumesh.v1 import common_pb2`; we rewrite those to `from services.pb.cpumesh.v1 import ...`
in the .py and .pyi files, so the generated modules live in a normal package that mypy follows and
no path is ever added to `sys.path`.

A SHA-256 of the proto sources (and of GENERATOR_VERSION) is written last, to
services/pb/PROTOS_SHA256; `services/pb/__init__.py` calls `check_generated` so that importing stale
or missing code fails at once with a clear message. Generation is skipped when the hash matches
(idempotent and quick) and runs under a file lock, so parallel `make protos` do not collide.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

# Bump when the generated layout changes, so that existing trees are regenerated.
GENERATOR_VERSION = "2"
HASH_FILE = "PROTOS_SHA256"
PACKAGE = "services.pb"
_REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = _REPO / "protos"
PB_DIR = _REPO / "services" / "pb"
_STUB_MYPY_OFF = "overload-cannot-match"
REGENERATE_HINT = "run `make protos` (or `python -m services.protogen`)"


def proto_files(proto_root: Path) -> list[Path]:
    """Every .proto file under `proto_root`, sorted by relative path."""
    return sorted(proto_root.rglob("*.proto"))


def proto_hash(proto_root: Path) -> str:
    """SHA-256 over the generator version and each proto's relative path and bytes."""
    digest = hashlib.sha256(f"cpumesh-protogen {GENERATOR_VERSION}\n".encode())
    for path in proto_files(proto_root):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(proto_root).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def expected_modules(proto_root: Path) -> list[Path]:
    """The generated files (relative to the output dir) that every proto must have."""
    out = []
    for path in proto_files(proto_root):
        stem = path.relative_to(proto_root).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            out.append(stem.with_name(stem.name + suffix))
    return out


def check_generated(pb_dir: Path, proto_root: Path) -> None:
    """Raise ImportError when the code in `pb_dir` is missing or was generated from other protos.

    Without a `proto_root` directory (an installed package), only the presence of the generated
    code is checked.
    """
    try:
        recorded = (pb_dir / HASH_FILE).read_text().strip()
    except FileNotFoundError:
        raise ImportError(
            f"generated protobuf code is missing in {pb_dir}: {REGENERATE_HINT}") from None
    if not proto_root.is_dir():
        return
    if recorded != proto_hash(proto_root):
        raise ImportError(
            f"generated protobuf code is stale (the protos in {proto_root} changed since it was "
            f"generated): {REGENERATE_HINT}")
    absent = [str(rel) for rel in expected_modules(proto_root) if not (pb_dir / rel).is_file()]
    if absent:
        raise ImportError(f"generated protobuf code is missing {', '.join(absent)} in {pb_dir}: "
                          f"{REGENERATE_HINT}")


def is_fresh(pb_dir: Path, proto_root: Path) -> bool:
    try:
        check_generated(pb_dir, proto_root)
    except ImportError:
        return False
    return True


def rewrite_imports(text: str, top_packages: Sequence[str], package: str) -> str:
    """`from cpumesh.v1 import x` → `from <package>.cpumesh.v1 import x` (and `import a.b`)."""
    names = "|".join(re.escape(p) for p in top_packages)
    text = re.sub(rf"^(\s*)from ({names})([.\s])", rf"\1from {package}.\2\3", text, flags=re.M)
    return re.sub(rf"^(\s*)import ({names})\.", rf"\1import {package}.\2.", text, flags=re.M)


def _plugin(name: str) -> Path | None:
    beside = Path(sys.executable).parent / name
    found = beside if beside.is_file() else shutil.which(name)
    return Path(found) if found else None


def _protoc_args(proto_root: Path, out: Path) -> list[str]:
    import grpc_tools  # the test extra; imported only when generating

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}"]
    mypy, mypy_grpc = _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc")
    if mypy and mypy_grpc:  # mypy-protobuf: typed messages and typed (sync and aio) stubs
        args += [f"--plugin=protoc-gen-mypy={mypy}", f"--mypy_out={out}",
                 f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}", f"--mypy_grpc_out={out}"]
    else:  # protoc's own stubs: messages only
        print("protogen: mypy-protobuf not found; writing message stubs only", file=sys.stderr)
        args.append(f"--pyi_out={out}")
    return args + [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]


@contextlib.contextmanager
def _locked(pb_dir: Path) -> Iterator[None]:
    with (pb_dir / ".protogen.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def generate(proto_root: Path = PROTO_ROOT, pb_dir: Path = PB_DIR, *, package: str = PACKAGE,
             force: bool = False) -> bool:
    """Generate code for every proto under `proto_root` into `pb_dir`; False when up to date."""
    files = proto_files(proto_root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    pb_dir.mkdir(parents=True, exist_ok=True)
    with _locked(pb_dir):
        if not force and is_fresh(pb_dir, proto_root):
            return False
        digest = proto_hash(proto_root)  # of the sources protoc is about to read
        with tempfile.TemporaryDirectory(prefix=".protogen-", dir=pb_dir) as tmp:
            out = Path(tmp)
            proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc",
                                   *_protoc_args(proto_root, out)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"protoc failed ({proc.returncode}):\n{proc.stderr}")
            tops = sorted({p.relative_to(proto_root).parts[0] for p in files})
            for path in out.rglob("*.py*"):
                text = rewrite_imports(path.read_text(), tops, package)
                if path.suffix == ".pyi":  # grpc is untyped here, so the stubs' overloads clash
                    text = f"# mypy: disable-error-code={_STUB_MYPY_OFF}\n{text}"
                path.write_text(text)
            for directory in [d for d in out.rglob("*") if d.is_dir()]:
                (directory / "__init__.py").touch()
            (pb_dir / HASH_FILE).unlink(missing_ok=True)  # stale from here until written again
            for top in tops:
                shutil.rmtree(pb_dir / top, ignore_errors=True)
                (out / top).rename(pb_dir / top)
        (pb_dir / HASH_FILE).write_text(digest + "\n")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.protogen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="regenerate even when up to date")
    parser.add_argument("--protos", type=Path, default=PROTO_ROOT, help="proto include root")
    parser.add_argument("--out", type=Path, default=PB_DIR, help="output package directory")
    parser.add_argument("--package", default=PACKAGE, help="import path of the output directory")
    args = parser.parse_args(argv)
    try:
        changed = generate(args.protos, args.out, package=args.package, force=args.force)
    except (RuntimeError, OSError) as e:
        print(f"protogen: error: {e}", file=sys.stderr)
        return 1
    print(f"protogen: {'generated' if changed else 'up to date'}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
