"""The content store heals, and never ships what it did not verify.

A blob changed on disk after the store verified it (a flipped bit, a hand edit, a tool writing
through a hard link) is caught while `build` packs it, whichever path takes it from the store: a
raw component in the runtime image's /bin, a member taken from an upstream tarball, the bundle's
supervisor, an image layer. The build stops naming the lock entry and the blob, writes no
artifact, and its hint names `store verify`, which removes the bad blob so `fetch` heals it.
Every test corrupts a real blob in a real store (a copy of the session's real release build).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import artifacts, cli
from builder import digest as dg
from builder.errors import BuilderError
from builder.fetch import components
from builder.lock import lockfile
from builder.oci import model as m
from builder.store import Store, StoreCorrupt
from builder.trust.verify import read_release_env
from tests.plugins.built import REPO, Built
from tests.rig import loopback


def _copy(built: Built, tmp_path: Path, index: bool = False) -> Built:
    """The session's store, blobs only (no derived caches: the runtime image is built anew)."""
    store = tmp_path / "store"
    shutil.copytree(built.store / "blobs", store / "blobs")
    if index:
        shutil.copytree(built.store / "index", store / "index")
    return dataclasses.replace(built, store=store, out=tmp_path / "artifacts")


def corrupt(store: Store, digest: str) -> None:
    """Flip one byte in the middle of a stored blob (ELF headers and gzip magic stay intact)."""
    path = store.blob_path(digest)
    path.chmod(0o644)  # blobs are read-only; whoever changes one on disk has to do this too
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    path.chmod(0o444)


def _component_digest(b: Built, name: str, arch: str) -> str:
    lock = lockfile.load(b.lock)
    digest = components.file_digest(Store(b.store), lock.components[name], arch)
    assert digest is not None
    return digest


def _refused(b: Built, entry: str, digest: str) -> str:
    res = b.cli("build", "--cross", "--artifacts", str(b.out), check=False)
    assert res.returncode == 1, res.stderr
    err = res.stderr
    assert "Traceback" not in err, err
    assert f"{entry}" in err and f"store blob {digest}" in err, err
    assert f"expected {digest}, got sha256:" in err, err
    assert f"run `python -m builder --store {b.store} store verify`" in err, err
    # No artifact: nothing was renamed into the artifacts directory, not even for the other arch.
    assert not b.out.exists() or sorted(p.name for p in b.out.iterdir()) == [], list(b.out.iterdir())
    return err


@pytest.mark.parametrize("component, arch, path", [
    ("runc", "arm64", "bin/runc"),  # a raw download, into the runtime image
    ("containerd", "amd64", "bin/containerd"),  # a member of the containerd tarball
    ("fixture-chart", "amd64", "charts/"),  # /charts of the runtime image
])
def test_build_refuses_a_changed_runtime_component(built, tmp_path, component, arch, path):
    b = _copy(built, tmp_path)
    digest = _component_digest(b, component, arch)
    corrupt(Store(b.store), digest)
    err = _refused(b, f"components.{component}.{arch}", digest)
    assert f"({path}" in err


@pytest.mark.parametrize("component", ["containerd", "socat"])  # a .tar.gz and a .deb
def test_build_refuses_to_take_members_from_a_changed_upstream_archive(built, tmp_path, component):
    """No member cache: the member is taken from the pinned archive, which must still hash to
    its pin (a flipped bit can leave an archive readable, its member bytes silently different)."""
    b = _copy(built, tmp_path)
    art = lockfile.load(b.lock).components[component].artifact("amd64")
    assert art is not None and art.digest
    corrupt(Store(b.store), art.digest)
    _refused(b, f"components.{component}", art.digest)


def test_build_refuses_a_changed_bundle_binary_and_writes_nothing(built, tmp_path):
    """The supervisor is packed into the bundle after the arch's archives were packed: those
    finished archives must not reach out/ either."""
    b = _copy(built, tmp_path, index=True)
    lock = lockfile.load(b.lock)
    assert lock.release.supervisor
    digest = _component_digest(b, lock.release.supervisor, "amd64")
    corrupt(Store(b.store), digest)
    err = _refused(b, f"components.{lock.release.supervisor}.amd64 (bin/{lock.release.name})", digest)
    assert "packed rke2-images.linux-amd64 (" in err  # packed, then held back


def test_build_refuses_a_changed_image_layer_of_the_second_arch(built, tmp_path):
    """amd64 packs fine; the arm64 layer is bad: amd64's finished archives must not be published."""
    b = _copy(built, tmp_path, index=True)
    store = Store(b.store)
    lock = lockfile.load(b.lock)
    amd64 = {d for img in lock.images_for("amd64") for d in _layers(store, img.platforms["amd64"])}
    arm64 = [d for img in lock.images_for("arm64") for d in _layers(store, img.platforms["arm64"])]
    layer = next(d for d in arm64 if d not in amd64)
    corrupt(store, layer)
    _refused(b, layer, layer)


def _layers(store: Store, manifest: str) -> list[str]:
    doc = m.parse_document(store.read_bytes(manifest), manifest)
    assert isinstance(doc, m.Manifest)
    return [d.digest for d in doc.layers]


def test_a_corrupt_manifest_is_refused_before_it_is_parsed(built, tmp_path):
    b = _copy(built, tmp_path, index=True)
    store = Store(b.store)
    manifest = lockfile.load(b.lock).images_for("amd64")[0].platforms["amd64"]
    corrupt(store, manifest)
    with pytest.raises(StoreCorrupt) as err:
        store.read_bytes(manifest)
    assert f"store blob {manifest}: digest mismatch: expected {manifest}" in str(err.value)
    assert "store verify" in str(err.value)


def test_store_verify_removes_bad_blobs_and_fetch_heals(tmp_path):
    """`store verify` on a real store: counts, removes the bad blob (and the index entry naming
    it), exits non-zero; the next `fetch` downloads it again from the real mirror."""
    with loopback.running(tmp_path / "lb", resolved=True) as lb:
        b = Built(tmp_path, lb.lock_path, tmp_path / "store", tmp_path / "artifacts", lb.mirrors_path)
        b.cli("fetch", "--files-only", "--arch", "amd64")
        store = Store(b.store)
        runc = _component_digest(b, "runc", "amd64")
        member = _component_digest(b, "containerd", "amd64")  # indexed as a tarball member
        good = store.blob_path(runc).read_bytes()
        corrupt(store, runc)
        corrupt(store, member)
        stray = store.blobs_dir() / "not-a-digest"
        stray.write_bytes(b"x")
        count = len(list(store.blobs_dir().iterdir())) - 1

        res = b.cli("store", "verify", check=False)
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        assert f"store {b.store}: checked {count} blobs (" in res.stderr
        assert "removed 3 and 1 index entries pointing at them" in res.stderr
        for d in (runc, member):
            assert f"removed: {d} (bytes hash to sha256:" in res.stderr
            assert not store.has(d)
        assert "removed: not-a-digest (not a blob written by this store)" in res.stderr
        assert "run `python -m builder fetch`" in res.stderr
        assert not stray.exists()

        fetched = b.cli("fetch", "--files-only", "--arch", "amd64")
        assert store.blob_path(runc).read_bytes() == good, fetched.stderr
        assert store.has(member)  # taken from the tarball again
        again = b.cli("store", "verify")
        assert f"checked {count} blobs" in again.stderr and "removed 0" in again.stderr


def test_store_verify_then_build_remakes_a_bad_runtime_layer(built, tmp_path):
    """A blob built here (the runtime image's layer) cannot be fetched: after `store verify`
    removed it, `build` must make it again, byte for byte, instead of saying "run fetch"."""
    b = _copy(built, tmp_path, index=True)
    store = Store(b.store)
    # the layers of the runtime this build ships (the session's store also holds the runtimes of
    # other tests' lock variants, which this build would not make again)
    _, env = read_release_env(built.out / artifacts.bundle_name("rke2", "amd64"))
    runtime_layers = sorted(env["RUNTIME_LAYERS"].split())
    assert runtime_layers and set(runtime_layers) <= set(_layers(store, env["RUNTIME_MANIFEST"]))
    layer = runtime_layers[0]
    corrupt(store, layer)
    res = b.cli("store", "verify", check=False)
    assert res.returncode == 1 and f"removed: {layer}" in res.stderr, res.stderr
    b.cli("build", "--cross", "--artifacts", str(b.out))
    assert store.has(layer)  # made again, byte for byte (the name is its sha256)

    def archives(out: Path) -> list[str]:  # the image archives hold the runtime image
        return sorted(line for f in out.glob("sha256sum-*.txt")
                      for line in f.read_text().splitlines() if " rke2-images" in line)

    assert archives(b.out) == archives(built.out) != []


# -- hints name real commands -------------------------------------------------------------------

_SPAN = re.compile(r"`([^`]+)`")


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal that is not a docstring; f-strings with each value as ``VALUE``."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "VALUE"
                                             for v in node.values)))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docs and id(node) not in inner):
            out.append((node.lineno, node.value))
    return out


def _subparsers(parser) -> dict:
    for action in parser._actions:
        if action.choices and hasattr(action, "_name_parser_map"):
            return action.choices
    return {}


def _check_command(words: list[str]) -> str | None:
    """Why ``words`` (after `python -m builder`) is not a command the CLI has; None if it is."""
    parser = cli.parser()
    chain = [parser]
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            action = next((a for p in chain for a in p._actions if flag in a.option_strings), None)
            if action is None:
                return f"{' '.join(chain[-1].prog.split()[3:]) or 'the CLI'} has no option {flag}"
            if action.nargs != 0 and "=" not in word:
                i += 1  # its value
        elif _subparsers(chain[-1]):
            sub = _subparsers(chain[-1])
            if word not in sub:
                return f"no command {word!r} (have: {', '.join(sub)})"
            chain.append(sub[word])
        i += 1
    if _subparsers(chain[-1]):
        return f"{words!r} stops before a subcommand"
    return None


def command_mentions(text: str) -> list[list[str]]:
    """`python -m builder X --y` spans, and bare `X --y` spans whose first word is a command."""
    commands = set(_subparsers(cli.parser()))
    found = []
    for span in _SPAN.findall(text):
        words = span.split()
        if words[:3] == ["python", "-m", "builder"]:
            found.append(words[3:])
        elif words and words[0] in commands:
            found.append(words)
    return found


def test_the_hint_checker_catches_what_it_must():
    assert _check_command(["verify", "--deep"]) == "verify has no option --deep"
    assert _check_command(["store", "check"]) is not None
    assert _check_command(["store"]) is not None
    assert _check_command(["--store", "DIR", "store", "verify"]) is None
    assert _check_command(["lock", "--refresh"]) is None
    assert command_mentions("the store was modified on disk; run `verify --deep`") == [["verify", "--deep"]]
    options = _all_options(cli.parser())
    assert unknown_flags("run verify --deep, or pass --arch", options) == ["--deep"]
    assert unknown_flags("run `verify --deep`", options) == []  # quoted: the command check's


def test_every_command_named_in_builder_exists():
    """Every `python -m builder ...` or `<command> --flag` in a message or hint under builder/
    names a subcommand and flags the CLI parser really has (this would have caught `verify
    --deep`, the repair hint that named a command that never existed)."""
    problems = []
    for path in sorted((REPO / "builder").rglob("*.py")):
        for line, text in _strings(ast.parse(path.read_text(), str(path))):
            for words in command_mentions(text):
                why = _check_command(words)
                if why:
                    problems.append(f"{path.relative_to(REPO)}:{line}: `{' '.join(words)}`: {why}")
    assert problems == []


# Flags of other tools that a hint names together with the tool (not options of ours).
FOREIGN_FLAGS = {
    "--platform",  # "docker buildx --platform" (builder/fetch/docker_api.py)
    "--format",  # "Trivy's --format json output" (builder/scan/findings.py)
}
_FLAG = re.compile(r"(?<![\w`-])--[a-z][a-z0-9-]*")


def _all_options(parser) -> set[str]:
    opts = {o for a in parser._actions for o in a.option_strings}
    for sub in _subparsers(parser).values():
        opts |= _all_options(sub)
    return opts


def _hint_positions() -> dict[str, int]:
    """Class name -> index of ``hint`` in its constructor, for every BuilderError subclass."""
    import builder

    for mod in pkgutil.walk_packages(builder.__path__, "builder."):
        if not mod.name.endswith("__main__"):  # importing that one runs the CLI
            importlib.import_module(mod.name)
    out: dict[str, int] = {}
    todo: list[type] = [BuilderError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        params = list(inspect.signature(cls.__init__).parameters)[1:]
        if "hint" in params:
            out[cls.__name__] = params.index("hint")
    return out


def _hint_nodes(tree: ast.AST, positions: dict[str, int]) -> list[ast.expr]:
    hints = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", "")
        hints.extend(k.value for k in node.keywords if k.arg == "hint")
        if name in positions and len(node.args) > positions[name]:
            hints.append(node.args[positions[name]])
    return hints


def _hint_texts() -> Iterator[tuple[str, str]]:
    """(file:line, text) of every string that goes into a hint anywhere in builder/."""
    positions = _hint_positions()
    for path in sorted((REPO / "builder").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for hint in _hint_nodes(tree, positions):
            for line, text in _strings(hint):
                yield f"{path.relative_to(REPO)}:{line}", text


def test_every_flag_a_hint_names_exists():
    """`--flag` in a hint outside a quoted command ("pass --arch") is an option of our CLI."""
    options = _all_options(cli.parser())
    problems = [f"{where}: {flag}" for where, text in _hint_texts()
                for flag in unknown_flags(text, options)]
    assert problems == []


def unknown_flags(text: str, options: set[str]) -> list[str]:
    """Flags outside `quoted commands` (those are checked whole) that our CLI does not have."""
    return [f for f in _FLAG.findall(_SPAN.sub("", text)) if f not in options | FOREIGN_FLAGS]


def test_store_verify_is_a_real_subcommand_and_reports_a_clean_store(tmp_path, capsys):
    store = Store(tmp_path / "s")
    store.put_bytes(b"one")
    assert cli.main(["--store", str(store.root), "store", "verify"]) == 0
    assert f"store {store.root}: checked 1 blobs (3 B), removed 0" in capsys.readouterr().err


def test_store_verify_removes_a_symlink_posing_as_a_blob(tmp_path):
    """A symlink under blobs/ (the store never makes one) is removed, its target left alone."""
    store = Store(tmp_path / "s")
    target = tmp_path / "target"
    target.write_bytes(b"one")
    (store.blobs_dir() / dg.hex_of(dg.of_bytes(b"one"))).symlink_to(target)
    report = store.check_all()
    assert report.removed and not store.has(dg.of_bytes(b"one")) and target.read_bytes() == b"one"
    with pytest.raises(BuilderError):
        store.open(dg.of_bytes(b"one"))


# -- hints name real fields --------------------------------------------------------------------------

# `field:` / `a.b: value` in backticks: how a hint names a YAML field the person should edit.
_FIELD_SPAN = re.compile(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*):(?:\s[^`]*)?`")
# "(ca_file)": a snake_case name in parentheses reads as a setting's name too.
_PAREN_FIELD = re.compile(r"\(([a-z][a-z0-9]*_[a-z0-9_]+)\)")
# The host's mirrors file has one field the lock may not hold (plain HTTP is the host's call).
MIRRORS_FILE_ONLY = {"insecure"}


def _schema_fields() -> set[str]:
    import json

    fields: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            fields.update(node.get("properties", {}) if isinstance(node.get("properties"), dict) else ())
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(lockfile.SCHEMA_FILE.read_text()))
    return fields


def unknown_fields(text: str, fields: set[str]) -> list[str]:
    """Fields a hint names in backticks (`insecure:`, `runtime.no_charts: <reason>`) that neither
    the lock's schema nor the host's mirrors file has."""
    spans = _FIELD_SPAN.findall(text) + _PAREN_FIELD.findall(text)
    return [span for span in spans if any(part not in fields for part in span.split("."))]


def test_the_field_checker_catches_what_it_must():
    fields = _schema_fields() | MIRRORS_FILE_ONLY
    assert unknown_fields("add it to `arches:` and list `insecure: [h:5000]`", fields) == []
    assert unknown_fields("set `runtime.no_charts: <reason>`", fields) == []
    assert unknown_fields("pass the CA file (`ca_file: x`) or `registries.tls:`", fields) == [
        "ca_file", "registries.tls"]
    assert unknown_fields("`host:5000`, `user:password`, `sha256:<hex>`", fields) == []
    # The hint a plain-HTTP registry used to get:
    assert unknown_fields("pass the registry's CA file (ca_file) or fix its certificate", fields) == [
        "ca_file"]
    assert unknown_fields("(see README) or (no_charts)", fields) == []


def test_every_field_a_hint_names_exists():
    """A hint that says which field to edit names one the lock's JSON Schema (or the host's
    mirrors file) really has: the plain-HTTP hint once named `ca_file`, which no file has."""
    fields = _schema_fields() | MIRRORS_FILE_ONLY
    problems = [f"{where}: `{field}:`" for where, text in _hint_texts()
                for field in unknown_fields(text, fields)]
    assert problems == []
