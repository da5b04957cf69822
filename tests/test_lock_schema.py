"""The JSON Schema of images.lock (builder/lock/images-lock.schema.json) says what the validator says.

It accepts every lock the tests use and refuses the bad inputs the validator's own tests feed it
(tests/test_lockfile.py, tests/adversarial/test_lock.py): each case runs through both and they
must agree. The few rules a schema cannot state are listed in SCHEMA_CANNOT with the reason, and
checked to stay true (the validator refuses, the schema accepts), so the list cannot go stale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.errors import LockError
from builder.lock import lockfile
from tests import test_lockfile as unit
from tests.adversarial import test_lock as adv
from tests.rig import mirror

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "images-lock.md"
VALIDATOR = jsonschema.Draft202012Validator(json.loads(lockfile.SCHEMA_FILE.read_text()))


def schema_errors(text: str) -> list[str]:
    """What the schema finds wrong in a lock, read as the validator reads it (PyYAML, safe)."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in VALIDATOR.iter_errors(yaml.safe_load(text))]


def validator_error(text: str) -> str | None:
    try:
        lockfile.parse(text)
    except LockError as exc:
        return str(exc)
    return None


def dump(data: dict) -> str:
    return yaml.safe_dump(data, allow_unicode=True)


def marked(test: Callable, argnames: str) -> list[Any]:
    """The values a test is parametrised with: the bad inputs are reused, not copied."""
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == argnames:
            return list(mark.args[1])
    raise LookupError(f"{test.__name__} has no parametrize({argnames!r})")


def edited(change: Callable[[dict], Any]) -> str:
    data = adv.base()
    change(data)
    return dump(data)


def _component_renamed(value: str) -> Callable[[dict], None]:
    def change(d: dict) -> None:  # as test_component_names_are_refused does it
        d["components"][value] = d["components"].pop("kubelet")
        d["release"]["supervisor"] = value
        d["runtime"]["bin"] = [value]
    return change


def _set(*path: Any) -> Callable[[Any], Callable[[dict], None]]:
    def value(v: Any) -> Callable[[dict], None]:
        def change(d: dict) -> None:
            node = d
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = v
        return change
    return value


def bad_inputs() -> dict[str, str]:
    """id -> lock text, every one refused by the validator."""
    cases: dict[str, str] = {}
    for edit, message in unit.MALFORMED:
        cases[f"unit: {message}"] = edit(unit.BASE)
    for field in sorted(adv.NAME_FIELDS):
        for value in adv.BAD_NAMES:
            cases[f"name {field}={value[:20]!r}"] = edited(lambda d, f=field, v=value: adv.NAME_FIELDS[f](d, v))
    for value in marked(adv.test_component_names_are_refused, "value"):
        cases[f"component name {value[:20]!r}"] = edited(_component_renamed(value))
    simple = {
        "release.version": (adv.test_release_version_is_plain_ascii, "version",
                            _set("release", "version")),
        "images[0].ref": (adv.test_image_reference_is_ascii, "ref", _set("images", 0, "ref")),
        "mode (special bits)": (adv.test_dangerous_modes_are_refused, "mode",
                                _set("components", "kubelet", "mode")),
        "mode (not a quoted octal)": (adv.test_modes_are_quoted_octal_strings, "mode",
                                      _set("components", "kubelet", "mode")),
        "size": (adv.test_size_is_a_positive_integer, "size",
                 _set("components", "kubelet", "arches", "amd64", "size")),
    }
    for label, (test, argname, setter) in simple.items():
        for value in marked(test, argname):
            cases[f"{label}={value!r}"[:80]] = edited(setter(value))
    # As test_runtime_repository_host_is_ascii and test_insecure_registries_in_the_lock_are_refused.
    cases["runtime.repository host not ASCII"] = edited(
        _set("runtime", "repository")("d\u043ecker.io/rancher/rke2-runtime"))
    cases["mirrors.insecure in the lock"] = edited(_set("mirrors")(
        {"registries": {"docker.io": {"endpoints": ["http://evil.example:5000"]}},
         "insecure": ["evil.example:5000"]}))
    for where, edit in marked(adv.test_trailing_newline_fails_pattern_checks, "where, edit"):
        cases[f"trailing newline in {where}"] = edited(edit)
    for i, data in enumerate(marked(adv.test_errors_truncate_values, "data")):
        cases[f"1 MB value #{i}"] = dump(data)
    for field, setter in adv.LAYER_FIELDS.items():
        for value in marked(adv.test_unknown_layer_modes_are_refused, "value"):
            cases[f"{field}={value!r}"[:80]] = edited(lambda d, s=setter, v=value: s(d, v))
    for groups, message in marked(adv.test_layer_group_overrides_are_checked, "groups, message"):
        cases[f"release.groups: {message}"] = edited(_set("release", "groups")(groups))
    return cases


# Rules the validator enforces that JSON Schema cannot state: case id -> why.
SCHEMA_CANNOT = {
    "unit: listed twice": "one image per ref: uniqueItems compares whole items, not one field",
    "unit: release.supervisor: names component 'kubectl', which components does not define":
        "a cross-reference: a schema cannot look up a value among another object's keys",
    "unit: runtime.bin[0]: names component 'kubectl', which components does not define":
        "a cross-reference: a schema cannot look up a value among another object's keys",
    "unit: images.lock: components.kubelet.amd64.size: expected int, got 1234.0":
        "JSON Schema counts 1234.0 as an integer (JSON has one number type)",
    "unit: images.lock: release.groups.canal: group 'canal' holds no image and not the runtime, "
    "so no archive would use this mode":
        "a cross-reference: a schema cannot look up a key among the values of other objects",
    "release.groups: release.groups.canal: group 'canal' holds no image and not the runtime":
        "a cross-reference: a schema cannot look up a key among the values of other objects",
}
# Refused while the YAML is read, before any data exists for a schema to see (an editor flags a
# YAML syntax error by itself); tests/adversarial/test_lock.py holds them under a memory limit.
YAML_LEVEL = {
    "bad syntax": "schema: 1\nrelease: [unclosed\n",
    **{f"anchors and aliases, line {line}": text
       for text, line in marked(adv.test_anchors_and_merge_keys_are_refused, "text, line")},
    "nesting past 32 levels": "a:\n" + "".join(f"{' ' * i}- \n" for i in range(1, 40)),
}


@pytest.mark.parametrize("case", sorted(YAML_LEVEL))
def test_yaml_level_refusals_need_no_schema(case):
    assert "not valid YAML" in validator_error(YAML_LEVEL[case])


BAD = bad_inputs()


def test_bad_inputs_cover_every_source():
    assert len(BAD) > 100
    assert all(case in BAD for case in SCHEMA_CANNOT), "an exception names no case"


@pytest.mark.parametrize("case", sorted(BAD))
def test_schema_refuses_what_the_validator_refuses(case):
    text = BAD[case]
    refused = validator_error(text)
    assert refused is not None, f"the validator accepts {case}"
    errors = schema_errors(text)
    if case in SCHEMA_CANNOT:
        assert not errors, f"the schema now states this rule: drop it from SCHEMA_CANNOT ({errors})"
    else:
        assert errors, f"the schema accepts what the validator refuses: {refused[:300]}"


def _daemon_lock() -> str:
    """A lock with an image from a Docker-API daemon, as tests/test_docker_source.py writes."""
    lock = lockfile.parse(unit.BASE)
    pin = lockfile.ImagePin("docker.io/ci/app:dev", ("core",), arches=("arm64",),
                            daemon="docker-daemon:ci/app:dev")
    return lockfile.dumps(dataclasses.replace(lock, images=(*lock.images, pin)))


def good_inputs() -> dict[str, str]:
    cases = {
        "committed images.lock": (REPO / "images.lock").read_text(),
        "unit BASE": unit.BASE,
        "unit BASE, a pin unresolved": unit.BASE.replace(f"sha256: {unit.HEX}}}", "sha256: null}", 1),
        "adversarial base": dump(adv.base()),
        "group a..b": edited(lambda d: d["images"][0].__setitem__("groups", ["a..b"])),
        "image from a daemon": _daemon_lock(),
        "component absent for every arch": edited(_set("components", "kubelet")({"absent": "gone"})),
        "mirrors without insecure": edited(_set("mirrors")(
            {"files": [{"prefix": "https://dl.k8s.io/", "endpoints": ["http://a.example/"],
                        "fallback": False}],
             "registries": {"docker.io": {"endpoints": ["http://mirror.lan:5000"]}}})),
    }
    cases["layer modes"] = unit.LAYERED
    cases["layer modes, null = not written"] = edited(_set("release", "layers")(None))
    cases["layer modes, no overrides"] = edited(_set("release", "groups")({}))
    for mode in adv.LAYER_MODES:
        cases[f"release.layers {mode}"] = edited(_set("release", "layers")(mode))
        cases[f"release.groups.core.layers {mode}"] = edited(
            _set("release", "groups")({"core": {"layers": mode}}))
    for mode, _ in marked(adv.test_plain_modes_load, "mode, value"):
        cases[f"mode {mode}"] = edited(_set("components", "kubelet", "mode")(mode))
    return cases


@pytest.mark.parametrize("case", sorted(good_inputs()))
def test_schema_accepts_every_lock_the_tests_use(case):
    text = good_inputs()[case]
    assert validator_error(text) is None
    assert schema_errors(text) == []


def test_schema_accepts_the_rig_locks(mirror_files):
    """The fixture lock (tests/plugins/files.py) and the loopback/demo lock (tests/rig/loopback.py):
    unresolved (as `make demo` writes it) and resolved, with a registry mirror."""
    _, files = mirror_files
    pins = (lockfile.ImagePin("docker.io/rancher/mirrored-library-busybox:1.36.1", ("core",)),
            lockfile.ImagePin("docker.io/rancher/fixture-socat:1.7.4", ("canal",),
                              f"sha256:{unit.HEX}", {"amd64": f"sha256:{unit.HEX}"}))
    registry = (lockfile.RegistryMirror("docker.io", ("http://127.0.0.1:5000",), fallback=False),)
    for lock in (mirror.lock_for(files, "http://127.0.0.1:8080"),
                 mirror.lock_for(files, "http://127.0.0.1:8080", images=pins, registry_mirrors=registry)):
        text = lockfile.dumps(lock)
        assert validator_error(text) is None
        assert schema_errors(text) == []


def documented(first_line: str) -> list[str]:
    """The ```yaml blocks of docs/images-lock.md that start with ``first_line``."""
    return re.findall(rf"```yaml\n({re.escape(first_line)}.*?)```", DOC.read_text(), re.S)


def test_documented_example_is_valid_and_its_check_output_is_what_the_doc_shows(tmp_path):
    """The doc's private-mirror lock passes both, and `lock --check` on it prints what the doc shows."""
    (text,) = documented("# yaml-language-server: $schema=")
    assert validator_error(text) is None
    assert schema_errors(text) == []
    (tmp_path / "images.lock").write_text(text)
    res = subprocess.run([sys.executable, "-m", "builder", "--lock", "images.lock", "lock", "--check"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))  # this checkout's builder
    assert res.returncode == 0, res.stderr
    shown = re.search(r"\$ python -m builder lock --check\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert res.stderr == textwrap.dedent(shown)


def test_documented_mirrors_file_is_valid():
    (text,) = documented("# mirrors.yaml")
    assert lockfile.parse_mirrors(text, "mirrors.yaml").insecure == ("registry.corp.example:5000",)


# -- property tests: the same verdict on generated values ----------------------------------------

@settings(max_examples=150, deadline=None)
@given(adv.NAMEISH)
def test_group_names_same_verdict(name):
    text = edited(lambda d: d["images"][0].__setitem__("groups", [name]))
    assert (validator_error(text) is None) == (schema_errors(text) == []), name


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(alphabet=st.sampled_from("01234567890o x\n"), max_size=6),
                 st.integers(min_value=-1, max_value=0o17777)))
def test_modes_same_verdict(mode):
    text = edited(_set("components", "kubelet", "mode")(mode))
    assert (validator_error(text) is None) == (schema_errors(text) == []), repr(mode)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789abcdefABCDEF:sha256\n \u0660"), max_size=80))
def test_digests_same_verdict(value):
    text = edited(lambda d: d["images"][0].__setitem__("digest", value))
    assert (validator_error(text) is None) == (schema_errors(text) == []), repr(value)


@settings(max_examples=150, deadline=None)
@given(st.from_regex(r"[a-zA-Z0-9./:_-]{1,40}", fullmatch=True))
def test_image_refs_same_verdict(ref):
    text = edited(lambda d: d["images"][0].__setitem__("ref", ref))
    assert (validator_error(text) is None) == (schema_errors(text) == []), ref


LAYER_VALUES = st.one_of(st.text(alphabet=st.sampled_from("registzdRZ \n\u0455"), max_size=9),
                        st.sampled_from(adv.LAYER_MODES), st.integers(), st.booleans(), st.none(),
                        st.lists(st.sampled_from(adv.LAYER_MODES), max_size=2))


@settings(max_examples=100, deadline=None)
@given(LAYER_VALUES, st.sampled_from(sorted(adv.LAYER_FIELDS)))
def test_layer_modes_same_verdict(value, field):
    text = edited(lambda d: adv.LAYER_FIELDS[field](d, value))
    assert (validator_error(text) is None) == (schema_errors(text) == []), (field, value)


@settings(max_examples=100, deadline=None)
@given(adv.NAMEISH, st.one_of(LAYER_VALUES, st.dictionaries(st.sampled_from(["layers", "level"]),
                                                           LAYER_VALUES, max_size=2)))
def test_layer_group_overrides_same_verdict(name, override):
    """The group is one an image is in (the one rule the schema cannot state holds either way)."""
    def change(d: dict) -> None:
        d["images"][0]["groups"] = [name]
        d["runtime"]["groups"] = [name]
        d["release"]["groups"] = {name: override}
    text = edited(change)
    assert (validator_error(text) is None) == (schema_errors(text) == []), (name, override)


NODE_CHECK = r"""
const schema = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = [];
(function walk(o) {
  if (o && typeof o === "object")
    for (const [k, v] of Object.entries(o)) k === "pattern" ? out.push(v) : walk(v);
})(schema);
const cases = JSON.parse(process.argv[1]);
const verdicts = cases.map(([where, value]) => new RegExp(out[where], "u").test(value));
console.log(JSON.stringify({count: out.length, verdicts}));
"""


def test_patterns_mean_the_same_to_an_editor():
    """Editors (yaml-language-server) run the patterns as ECMA-262 regexes with the u flag: each
    compiles there, and gives the verdict Python gives, trailing newline included."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (editors' regex engine)")
    patterns: list[str] = []

    def walk(node_: Any) -> None:
        if isinstance(node_, dict):
            for key, value in node_.items():
                if key == "pattern":
                    patterns.append(value)
                else:
                    walk(value)
        elif isinstance(node_, list):
            for value in node_:
                walk(value)

    walk(json.loads(lockfile.SCHEMA_FILE.read_text()))
    samples = ["core", "core\n", "0755", "0757", "v1.2+x", f"sha256:{unit.HEX}", unit.HEX,
               "docker.io/rancher/x:1", "docker.io/x:1", "localhost:5000/a/b:c", "a/../b",
               "https://x", "docker-daemon:a:b", ""]
    cases = [(i, s) for i in range(len(patterns)) for s in samples]
    res = subprocess.run([node, "-e", NODE_CHECK, json.dumps(cases)], input=lockfile.SCHEMA_FILE.read_text(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["count"] == len(patterns)
    assert got["verdicts"] == [re.search(patterns[i], s) is not None for i, s in cases]
