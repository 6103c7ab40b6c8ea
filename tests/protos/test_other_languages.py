"""The protos as Java and C# users get them: generated with protoc, no name clashes.

Java is generated with protoc's --java_out and gRPC's Java plugin, then compiled with
javac beside a user file that wildcard-imports ``io.grpc.*``, ``io.grpc.stub.*`` and our
package and names every generated class: a class that shares a name with one of gRPC's
(``Status``, ``Metadata``...) makes that reference ambiguous and the compile fails.
C# has no compiler here (Debian ships neither the gRPC C# plugin nor Google.Protobuf for
Mono), so its output is read: protoc renames a property that would clash with its own
class (``Points`` in ``Points`` became ``Points_``), and no generated type may take a
name that C# gRPC code imports from Grpc.Core, System, System.Threading.Tasks or
Google.Protobuf. protoc, javac and the jars come from Debian via ``.ci/system-deps``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.container.engine import missing_or_skip
from visionrpc.protos import generate, inference_pb2, model_control_pb2

PROTO_ROOT = Path(generate.__file__).resolve().parent
VISIONRPC_PROTOS = tuple(name for name in generate.PROTO_FILES if name.startswith("visionrpc/"))
JAVA_PACKAGE = "com.visionrpc.v1"
# What the generated code needs at compile time, as Debian installs it.
# geronimo's annotation jar holds javax.annotation.Generated, which Java 11+ dropped.
JAVA_JARS = (
    "protobuf",
    "grpc-api",
    "grpc-stub",
    "grpc-protobuf",
    "guava",
    "jsr305",
    "geronimo-annotation-1.3-spec",
)

# Types a C# gRPC client or server has in scope through its usual `using` lines.
CSHARP_NAMES_IN_SCOPE = frozenset(
    {
        # Grpc.Core
        "AsyncClientStreamingCall", "AsyncDuplexStreamingCall", "AsyncServerStreamingCall",
        "AsyncUnaryCall", "AuthContext", "AuthProperty", "CallCredentials", "CallInvoker",
        "CallOptions", "Calls", "Channel", "ChannelBase", "ChannelCredentials", "ChannelOption",
        "ChannelState", "ClientBase", "DeserializationContext", "Marshaller", "Marshallers",
        "Metadata", "Method", "MethodType", "RpcException", "SerializationContext", "Server",
        "ServerCallContext", "ServerCredentials", "ServerPort", "ServerServiceDefinition",
        "SslCredentials", "Status", "StatusCode", "WriteFlags", "WriteOptions",
        # System.Threading.Tasks
        "Task", "TaskFactory", "TaskScheduler", "TaskStatus", "ValueTask", "Parallel",
        # System
        "Action", "Array", "Attribute", "Buffer", "Console", "Convert", "DateTime", "Delegate",
        "Enum", "Environment", "Exception", "Func", "Guid", "Index", "Math", "Nullable",
        "Object", "Random", "Range", "String", "TimeSpan", "Tuple", "Type", "Uri", "Version",
        # Google.Protobuf and its well-known types
        "ByteString", "CodedInputStream", "CodedOutputStream", "JsonFormatter", "JsonParser",
        "MessageParser", "Any", "Duration", "Empty", "Struct", "Timestamp", "Value", "ListValue",
    }
)  # fmt: skip


def _tool(name: str) -> str:
    found = shutil.which(name)
    missing_or_skip([] if found else [f"{name} is not installed"])
    assert found is not None
    return found


def _protoc(tmp_path: Path, *outputs: str) -> None:
    subprocess.run(
        [
            _tool("protoc"),
            f"-I{PROTO_ROOT}",
            *outputs,
            *(str(PROTO_ROOT / name) for name in VISIONRPC_PROTOS),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def _services() -> list[str]:
    return [
        service.name
        for module in (inference_pb2, model_control_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    ]


def _java_classpath() -> str:
    jars = [Path("/usr/share/java") / f"{name}.jar" for name in JAVA_JARS]
    missing_or_skip([f"{jar} is not installed" for jar in jars if not jar.exists()])
    return ":".join(str(jar) for jar in jars)


@pytest.fixture(scope="module")
def java_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("java")
    _protoc(
        out,
        f"--java_out={out}",
        f"--plugin=protoc-gen-grpc-java={_tool('grpc_java_plugin')}",
        f"--grpc-java_out={out}",
    )
    return out / Path(*JAVA_PACKAGE.split("."))


def test_java_gets_one_file_per_type_and_a_grpc_class_per_service(java_sources: Path) -> None:
    names = {path.stem for path in java_sources.glob("*.java")}
    assert {"PredictRequest", "ErrorStatus", "ModelTask", "PointList"} <= names
    assert {f"{service}Grpc" for service in _services()} <= names
    # The outer classes are named, so protoc never has to invent "...OuterClass".
    assert {"InferenceProto", "ModelControlProto"} <= names
    assert not [name for name in names if name.endswith("OuterClass")]


def test_java_compiles_beside_wildcard_grpc_imports_without_ambiguous_names(
    java_sources: Path, tmp_path: Path
) -> None:
    classes = sorted(
        path.stem for path in java_sources.glob("*.java") if not path.stem.endswith("OrBuilder")
    )
    user = tmp_path / "UsesEveryName.java"
    user.write_text(
        "import io.grpc.*;\n"
        "import io.grpc.stub.*;\n"
        f"import {JAVA_PACKAGE}.*;\n\n"
        "class UsesEveryName {\n"
        "  static final Class<?>[] NAMES = {\n"
        + "".join(f"    {name}.class,\n" for name in classes)
        + "    Status.class, Metadata.class, StreamObserver.class,\n"
        "  };\n"
        "}\n"
    )
    compiled = subprocess.run(
        [
            _tool("javac"),
            "-nowarn",
            "-proc:none",
            "-d",
            str(tmp_path / "classes"),
            "-cp",
            _java_classpath(),
            *(str(path) for path in sorted(java_sources.glob("*.java"))),
            str(user),
        ],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr[-4000:]


@pytest.fixture(scope="module")
def csharp_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("csharp")
    _protoc(out, f"--csharp_out={out}")
    return "\n".join(path.read_text() for path in sorted(out.glob("*.cs")))


def test_csharp_types_sit_in_the_visionrpc_namespace(csharp_source: str) -> None:
    assert set(re.findall(r"^namespace ([\w.]+)", csharp_source, re.MULTILINE)) == {"VisionRpc.V1"}


def test_csharp_properties_keep_their_field_names(csharp_source: str) -> None:
    # protoc appends "_" to a property that would share its class's name.
    renamed = re.findall(r"public [\w.:<>]+ (\w+_) \{", csharp_source)
    assert renamed == []


def test_csharp_type_names_clash_with_nothing_a_grpc_program_imports(csharp_source: str) -> None:
    types = set(re.findall(r"public (?:sealed partial class|enum) (\w+)", csharp_source))
    # The gRPC C# plugin names its static class after the service, beside the messages.
    services = set(_services())
    assert {"PredictRequest", "ErrorStatus", "ModelTask"} <= types
    assert (types | services) & CSHARP_NAMES_IN_SCOPE == set()
    assert types & services == set()
