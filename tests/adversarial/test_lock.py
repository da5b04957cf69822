"""Attacker (c): a pull request editing images.lock. The lock cannot reach outside its box.

Names that become file names, file modes, plain-HTTP registries, whole-string pattern checks,
YAML alias bombs and nesting, and the length of values echoed in errors. Each case here was
accepted (or hung, or raised something other than a LockError) before issue 10.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from builder.errors import LockError
from builder.lock import lockfile

REPO = Path(__file__).resolve().parents[2]
HEX = "4bc04c3f50725fa29ac9f0626c553941cfe07d128b3a313b7f5d176b07ab786e"
# The rules as issue 10 states them; the tests check the loader against this statement.
NAME_RULE = re.compile(r"[a-z0-9][a-z0-9._-]*")
NAME_MAX = 63  # tightened here: a name is part of a file name, which has at most 255 bytes
FORBIDDEN_BITS = 0o7002


def base() -> dict:
    """A small valid lock as data; each test breaks one field of a fresh copy."""
    return {
        "schema": 1,
        "release": {"name": "rke2", "version": "v1.32.13+rke2r1", "default_groups": ["core"],
                    "supervisor": "kubelet"},
        "arches": ["amd64"],
        "components": {
            "kubelet": {"version": "v1.32.13", "arches": {"amd64": {
                "url": "https://dl.k8s.io/release/v1.32.13/bin/linux/amd64/kubelet",
                "sha256": HEX, "size": 1234}}},
        },
        "runtime": {"repository": "docker.io/rancher/rke2-runtime", "groups": ["core"],
                    "bin": ["kubelet"], "charts": []},
        "images": [{"ref": "docker.io/rancher/mirrored-pause:3.6", "groups": ["core"],
                    "digest": f"sha256:{HEX}", "platforms": {"amd64": f"sha256:{HEX}"}}],
    }


def parse(data: dict) -> lockfile.Lock:
    return lockfile.parse(yaml.safe_dump(data, allow_unicode=True))


def refused(data: dict) -> str:
    with pytest.raises(LockError) as err:
        parse(data)
    return str(err.value)


def test_base_is_valid():
    lock = parse(base())
    assert lock.components["kubelet"].arches["amd64"].size == 1234


# -- names: nothing that becomes a path may climb out of artifacts/ ------------------------------

BAD_NAMES = ["x/../../..", "..", ".", "a/b", "/etc", "Core", "core\n", "c\u043ere", ".hidden",
             "-x", "a b", "x" * 64, "x" * 300 + "/.."]
NAME_FIELDS = {
    "images[0].groups[0]": lambda d, v: d["images"][0].__setitem__("groups", [v]),
    "release.default_groups[0]": lambda d, v: d["release"].__setitem__("default_groups", [v]),
    "runtime.groups[0]": lambda d, v: d["runtime"].__setitem__("groups", [v]),
    "release.name": lambda d, v: d["release"].__setitem__("name", v),
    "components.kubelet.target": lambda d, v: d["components"]["kubelet"].__setitem__("target", v),
}


@pytest.mark.parametrize("field", sorted(NAME_FIELDS))
@pytest.mark.parametrize("value", BAD_NAMES, ids=repr)
def test_names_that_would_be_paths_are_refused(field, value):
    data = base()
    NAME_FIELDS[field](data, value)
    text = refused(data)
    assert re.search(r"expected a [a-z ]*name of lowercase ASCII letters", text), text[:300]
    # The field path is named (the image's path carries its reference).
    where = field.replace("images[0]", "images[0] (docker.io/rancher/mirrored-pause:3.6)")
    assert where in text


@pytest.mark.parametrize("value", [*BAD_NAMES[:-1], ""], ids=repr)
def test_component_names_are_refused(value):
    data = base()
    data["components"][value] = data["components"].pop("kubelet")
    data["release"]["supervisor"] = value
    data["runtime"]["bin"] = [value]
    assert "expected a component name" in refused(data)


def test_names_with_dots_inside_stay_one_path_part():
    """`a..b` passes the rule; it is only ever one file name, so it cannot climb."""
    data = base()
    data["images"][0]["groups"] = ["a..b"]
    assert parse(data).groups == ("core", "a..b")


def test_build_refuses_a_climbing_group_at_load(tmp_path):
    data = base()
    data["images"][0]["groups"] = ["x/../../.."]
    lock = tmp_path / "images.lock"
    lock.write_text(yaml.safe_dump(data))
    res = subprocess.run([sys.executable, "-m", "builder", "--lock", str(lock), "--store",
                          str(tmp_path / "store"), "build", "--artifacts", str(tmp_path / "artifacts")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert ("images.lock: images[0] (docker.io/rancher/mirrored-pause:3.6).groups[0]: expected a "
            "group name of lowercase ASCII letters") in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.lock"]  # nothing written


@pytest.mark.parametrize("version", ["v1\n", "v1;reboot", "$(id)", "v1'x", "", "v1.0\u00e9"],
                         ids=repr)
def test_release_version_is_plain_ascii(version):
    data = base()
    data["release"]["version"] = version
    assert "release.version" in refused(data)


@pytest.mark.parametrize("ref", ["ev\u0456l.io/a/b:1", "docker.io/a/b:t\u00e4g"], ids=repr)
def test_image_reference_is_ascii(ref):
    data = base()
    data["images"][0]["ref"] = ref
    assert "expected an ASCII registry host and tag" in refused(data)


def test_runtime_repository_host_is_ascii():
    data = base()
    data["runtime"]["repository"] = "d\u043ecker.io/rancher/rke2-runtime"
    assert "runtime.repository: expected an ASCII registry host" in refused(data)


# -- modes: a correctly signed release must not ship a setuid root binary ------------------------

@pytest.mark.parametrize("mode", ["4755", "2755", "1755", "6755", "0777", "0757", "0666", "7777"])
def test_dangerous_modes_are_refused(mode):
    data = base()
    data["components"]["kubelet"]["mode"] = mode
    text = refused(data)
    assert "components.kubelet.mode" in text and "setuid, setgid, sticky or world-writable" in text


@pytest.mark.parametrize("mode", [493, 755, "0o755", " 755", "7_55", "0755\n", "00755", "0x1ed",
                                  "75", "\u0667\u0665\u0665"], ids=repr)
def test_modes_are_quoted_octal_strings(mode):
    data = base()
    data["components"]["kubelet"]["mode"] = mode
    assert "expected a quoted octal mode such as '0755'" in refused(data)


@pytest.mark.parametrize("mode, value", [("0755", 0o755), ("755", 0o755), ("0644", 0o644),
                                         ("0750", 0o750), ("0600", 0o600)])
def test_plain_modes_load(mode, value):
    data = base()
    data["components"]["kubelet"]["mode"] = mode
    assert parse(data).components["kubelet"].mode == value


# -- plain HTTP is the build host's decision, not the pull request's ------------------------------

def test_insecure_registries_in_the_lock_are_refused():
    data = base()
    data["mirrors"] = {"registries": {"docker.io": {"endpoints": ["http://evil.example:5000"]}},
                       "insecure": ["evil.example:5000"]}
    with pytest.raises(LockError) as err:
        parse(data)
    assert err.value.message == ("images.lock: mirrors.insecure: plain-HTTP registries are not "
                                 "allowed in images.lock")
    assert "--mirrors FILE or BUILDER_MIRRORS" in err.value.hint


def test_insecure_registries_come_from_the_host_mirrors_file(tmp_path):
    data = base()
    data["mirrors"] = {"registries": {"docker.io": {"endpoints": ["http://mirror.lan:5000"]}}}
    lock = parse(data)
    host = lockfile.parse_mirrors("insecure: [mirror.lan:5000]\n", "mirrors.yaml")
    assert lock.with_mirrors(host).mirrors.insecure == ("mirror.lan:5000",)
    # ...and a lock carrying a merged host config never writes `insecure` back.
    assert "insecure" not in lockfile.dumps(lock.with_mirrors(host))


# -- whole-string patterns ----------------------------------------------------------------------

@pytest.mark.parametrize("where, edit", [
    ("images[0] (docker.io/rancher/mirrored-pause:3.6).digest",
     lambda d: d["images"][0].__setitem__("digest", f"sha256:{HEX}\n")),
    ("platforms.amd64", lambda d: d["images"][0]["platforms"].__setitem__("amd64", f"sha256:{HEX}\n")),
    ("components.kubelet.amd64.sha256",
     lambda d: d["components"]["kubelet"]["arches"]["amd64"].__setitem__("sha256", HEX + "\n")),
])
def test_trailing_newline_fails_pattern_checks(where, edit):
    data = base()
    edit(data)
    text = refused(data)
    assert where in text and "\\n'" in text  # the value shown escaped, newline visible


@pytest.mark.parametrize("size", [0, -1, "12", True, 1.5])
def test_size_is_a_positive_integer(size):
    data = base()
    data["components"]["kubelet"]["arches"]["amd64"]["size"] = size
    assert "components.kubelet.amd64.size" in refused(data)


def test_size_is_optional_and_written_canonically():
    data = base()
    del data["components"]["kubelet"]["arches"]["amd64"]["size"]
    lock = parse(data)
    assert lock.components["kubelet"].arches["amd64"].size is None
    assert "size:" not in lockfile.dumps(lock)
    sized = lockfile.dumps(parse(base()))
    assert f"sha256: {HEX}\n        size: 1234\n" in sized
    assert lockfile.dumps(lockfile.parse(sized)) == sized


# -- bounded resources --------------------------------------------------------------------------

BILLION_LAUGHS = textwrap.dedent("""\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """)

# Runs the loader in a child with 512 MiB of address space and a time limit, so a regression
# (an alias bomb expanding again) fails this test instead of hanging or swapping the suite.
GUARDED = textwrap.dedent("""\
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
    from builder.lock import lockfile
    from builder.errors import LockError
    try:
        lockfile.parse(sys.stdin.read())
    except LockError as exc:
        print(exc)
        sys.exit(3)
    """)


def _guarded_parse(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", GUARDED], input=text, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_billion_laughs_is_refused_at_once():
    assert len(BILLION_LAUGHS) < 600
    res = _guarded_parse(BILLION_LAUGHS)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout.startswith("images.lock: not valid YAML (line 1, column 4): YAML anchors and "
                                 "aliases (&name, *name, <<) are not allowed")


@pytest.mark.parametrize("text, line", [
    ("schema: 1\nrelease: &r {name: rke2, version: v1}\n", 2),          # an anchor alone
    ("schema: 1\nbase: {a: 1}\nrelease:\n  <<: *base\n", 4),           # a merge key
])
def test_anchors_and_merge_keys_are_refused(text, line):
    with pytest.raises(LockError, match=rf"line {line}, column \d+\): YAML anchors and aliases"):
        lockfile.parse(text)


@pytest.mark.parametrize("text", ["[" * 100_000, "a:\n" + "".join(f"{' ' * i}- \n" for i in range(1, 2000))],
                         ids=["flow", "block"])  # short ids: pytest puts them in the child's environment
def test_deep_nesting_is_a_lock_error(text):
    res = _guarded_parse(text)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "nested more than 32 levels deep" in res.stdout


@pytest.mark.parametrize("data", [
    {"schema": 1, "x" * 1_000_000: 1},
    {**base(), "release": {"name": "x" * 1_000_000, "version": "v1"}},
    {**base(), "components": {"k" * 1_000_000: {"absent": "no"}}},
    {**base(), "images": [{"ref": "docker.io/a/b:" + "t" * 1_000_000, "groups": ["core"]}]},
    {**base(), "images": [{**base()["images"][0], "groups": ["g" * 1_000_000]}]},
    {**base(), "release": {"name": "rke2", "version": "v" * 1_000_000}},
    {**base(), "release": {**base()["release"], "layers": "z" * 1_000_000}},
    {**base(), "release": {**base()["release"], "groups": {"g" * 1_000_000: {"layers": "zstd"}}}},
], ids=["key", "release-name", "component-name", "ref", "group", "version", "layers", "layers-group"])
def test_errors_truncate_values(data):
    text = refused(data)
    assert len(text) < 600, text[:600]
    assert "..." in text


# -- property tests -----------------------------------------------------------------------------

NAMEISH = st.text(alphabet=st.sampled_from("az09._-/A\n \u0430\u0131\u212a\uff41"), max_size=70)


@settings(max_examples=200, deadline=None)
@given(NAMEISH)
def test_group_names_accepted_iff_rule(name):
    data = base()
    data["images"][0]["groups"] = [name]
    ok = NAME_RULE.fullmatch(name) is not None and len(name) <= NAME_MAX
    if ok:
        assert parse(data).images[0].groups == (name,)
    else:
        refused(data)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(alphabet=st.sampled_from("01234567890o x\n"), max_size=6),
                 st.integers(min_value=-1, max_value=0o17777)))
def test_modes_accepted_iff_rule(mode):
    data = base()
    data["components"]["kubelet"]["mode"] = mode
    ok = (isinstance(mode, str) and re.fullmatch(r"[0-7]{3,4}", mode) is not None
          and not int(mode, 8) & FORBIDDEN_BITS)
    if ok:
        assert parse(data).components["kubelet"].mode == int(mode, 8)
    else:
        refused(data)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789abcdefABCDEF:sha256\n \u0660"), max_size=80))
def test_digests_accepted_iff_whole_string_matches(value):
    data = base()
    data["images"][0]["digest"] = value
    if re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        assert parse(data).images[0].digest == value
    else:
        refused(data)


YAMLISH = st.text(alphabet=st.sampled_from(list("ab01:-[]{}&*!<>|'\",#?%@`\n\t ") + ["\u2028", "\x85",
                                                                                       "\x00", "é"]),
                  max_size=60)


def _mutations(text: str) -> st.SearchStrategy[str]:
    lines = text.splitlines(keepends=True)
    return st.tuples(st.integers(0, len(lines)), st.integers(0, 3), YAMLISH).map(
        lambda t: "".join(lines[:t[0]]) + t[2] + "".join(lines[t[0] + t[1]:]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(YAMLISH, _mutations(yaml.safe_dump(base()))))
@example("[" * 5000)  # RecursionError before
@example("release: {version: 2020-02-30}")  # ValueError from PyYAML's date constructor
@example("schema: " + "1" * 5000)  # ValueError: Python's int digit limit
def test_loader_raises_only_lock_errors(text):
    try:
        lockfile.parse(text)
        lockfile.parse_mirrors(text, "mirrors.yaml")
    except LockError:
        pass


# -- layer modes (issue 14): release.layers and release.groups.NAME.layers ---------------------

LAYER_MODES = ("registry", "zstd")  # as issue 14 and docs/images-lock.md state them


def _layers(data: dict, value: Any) -> None:
    data["release"]["layers"] = value


def _group_layers(data: dict, value: Any) -> None:
    data["release"]["groups"] = {"core": {"layers": value}}


LAYER_FIELDS = {"release.layers": _layers, "release.groups.core.layers": _group_layers}
# Wrong types, unknown modes, near misses (case, space, newline, look-alike letters), deep values.
BAD_LAYER_MODES = ["lz4", "gzip", "ZSTD", "zstd ", "zstd\n", "z\u0455td", "", "registry,zstd", 3,
                   True, 1.5, ["zstd"], {"zstd": None}, [[[["zstd"]]]], {"a": {"b": {"c": "zstd"}}},
                   "zstd" * 250_000]


@pytest.mark.parametrize("field", sorted(LAYER_FIELDS))
@pytest.mark.parametrize("value", BAD_LAYER_MODES, ids=lambda v: repr(v)[:24])
def test_unknown_layer_modes_are_refused(field, value):
    data = base()
    LAYER_FIELDS[field](data, value)
    text = refused(data)
    assert f"images.lock: {field}: expected one of registry, zstd, got " in text
    assert len(text) < 600  # a 1 MB value is shown clipped


@pytest.mark.parametrize("groups, message", [
    ({"core": {"layers": "zstd", "compress": "max"}},
     "release.groups.core.compress: unknown field (expected one of: layers)"),
    ({"core": {}}, "release.groups.core.layers: missing required field"),
    ({"core": {"layers": None}}, "release.groups.core.layers: missing required field"),
    ({"core": "zstd"}, "release.groups.core: expected a mapping, got 'zstd'"),
    ({"core": ["zstd"]}, "release.groups.core: expected a mapping, got ['zstd']"),
    (["core"], "release.groups: expected a mapping, got ['core']"),
    ("zstd", "release.groups: expected a mapping, got 'zstd'"),
    ({"../x": {"layers": "zstd"}}, "release.groups.../x: expected a group name"),
    ({1: {"layers": "zstd"}}, "release.groups.1: expected a group name"),
    ({"core": {"layers": "zstd"}, "canal": {"layers": "registry"}},
     "release.groups.canal: group 'canal' holds no image and not the runtime"),
], ids=repr)
def test_layer_group_overrides_are_checked(groups, message):
    data = base()
    data["release"]["groups"] = groups
    assert f"images.lock: {message}" in refused(data)


def test_a_layer_group_nothing_uses_is_named_with_the_groups_that_exist():
    data = base()
    data["images"][0]["groups"] = ["core", "canal"]
    data["runtime"]["groups"] = ["infra"]
    data["release"]["groups"] = {"calico": {"layers": "registry"}}
    with pytest.raises(LockError) as err:
        parse(data)
    assert err.value.message == ("images.lock: release.groups.calico: group 'calico' holds no "
                                 "image and not the runtime, so no archive would use this mode")
    assert err.value.hint == "groups in this lock (images[].groups, runtime.groups): core, canal, infra"


def test_deeply_nested_layer_values_are_refused_before_they_expand():
    nested = "[" * 100_000 + "]" * 100_000
    text = yaml.safe_dump(base()).replace("name: rke2", f"name: rke2\n  layers: {nested}", 1)
    res = _guarded_parse(text)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "nested more than 32 levels deep" in res.stdout


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(alphabet=st.sampled_from("registzdRZ \n\u0455"), max_size=9),
                 st.sampled_from(LAYER_MODES), st.integers(), st.booleans(), st.none(),
                 st.lists(st.sampled_from(LAYER_MODES), max_size=2)),
       st.sampled_from(sorted(LAYER_FIELDS)))
def test_layer_modes_accepted_iff_known(value, field):
    data = base()
    LAYER_FIELDS[field](data, value)
    if isinstance(value, str) and value in LAYER_MODES:
        lock = parse(data)
        assert lock.layer_mode("core") == value
    elif value is None and field == "release.layers":  # `layers: null` = not written
        assert parse(data).release.layers is None
    else:
        refused(data)


@settings(max_examples=100, deadline=None)
@given(NAMEISH, st.sampled_from(["core", "canal", None]))
def test_layer_group_names_accepted_iff_a_used_group(name, image_group):
    """A group override is accepted iff its key is a group name that an image or the runtime uses."""
    data = base()
    if image_group is not None:
        data["images"][0]["groups"] = [image_group]
    data["release"]["groups"] = {name: {"layers": "registry"}}
    used = {"core"} | ({image_group} if image_group else set())  # the runtime is in core
    ok = NAME_RULE.fullmatch(name) is not None and len(name) <= NAME_MAX and name in used
    if ok:
        assert parse(data).layer_mode(name) == "registry"
    else:
        refused(data)
