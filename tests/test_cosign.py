"""Upstream image signatures (issue 17, item 4): cosign key-based signatures on a real registry.

Images are pushed to the rig's real CNCF registry and signed there by tests/rig/cosign.py (the
`cryptography` package, cosign's documented format). `fetch` (pull_images) must accept an image
pinned with a cosign key only when a signature by that key for its digest and repository is in
the `sha256-<hex>.sig` tag; `build`'s check (builder.fetch.signatures.check_lock) verifies the stored signature
again without a network. openssl is the independent verifier of the signatures we make.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from builder.errors import LockError
from builder.fetch.images import pull_images
from builder.fetch.signatures import check_lock, fetch_signature
from builder.lock import lockfile
from builder.lock.lockfile import ImagePin, Lock
from builder.oci import cosign
from builder.oci.convert import REGISTRY_MANIFEST
from builder.oci.layer import FileEntry
from builder.oci.reference import Reference
from builder.store import Store
from tests.plugins.registry import Setup
from tests.rig import cosign as rig_cosign
from tests.rig.images import build_single, lock_for
from tests.rig.registry import Registry

ARCH = "amd64"


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    """A real registry, a publisher's key and an attacker's key, and a push/sign helper."""
    work = tmp_path_factory.mktemp("cosign")
    reg = Registry(work=work / "registry").start()
    setup = Setup("cosign", reg, [])
    store = Store(work / "publisher-store")
    keys = work / "keys"
    good, other = rig_cosign.new_signer(keys, "publisher"), rig_cosign.new_signer(keys, "other")
    try:
        yield setup, store, good, other, keys
    finally:
        reg.stop()


def _image(signing, name: str) -> tuple[ImagePin, Reference]:
    """A distinct single-platform image pushed as fixtures/NAME:1.0; its pin and reference."""
    setup, store, *_ = signing
    img = build_single(store, f"fixtures/{name}", "1.0", ARCH,
                       [FileEntry("etc/name", name.encode(), 0o644)])
    client = setup.client(anonymous=True)
    client.push_tree(store, Reference(setup.host, img.repository, img.tag), img.top)
    pin = img.pin(setup.host)
    return pin, pin.reference


def _lock(signing, pin: ImagePin, key: Path) -> Lock:
    setup, _store, _good, _other, keys = signing
    lock = lock_for([replace(pin, cosign_key=key.name)], (ARCH,), setup.mirrors)
    return replace(lock, path=keys / "images.lock")  # key paths are relative to the lock


def _fetch(signing, lock: Lock, tmp_path: Path):
    setup = signing[0]
    return pull_images(lock, (ARCH,), Store(tmp_path / "store"), client=setup.client(anonymous=True),
                       quiet=True)


def _refused(signing, lock: Lock, tmp_path: Path) -> str:
    with pytest.raises(cosign.SignatureError) as err:
        _fetch(signing, lock, tmp_path)
    text = str(err.value)
    assert lock.images[0].ref in text and str(lock.cosign_key(lock.images[0])) in text
    return text


def test_signed_image_fetches_and_build_rechecks_offline(signing, tmp_path):
    setup, store, good, _other, _keys = signing
    pin, ref = _image(signing, "signed")
    rig_cosign.sign_image(setup.client(anonymous=True), store, good, ref, pin.digest)
    lock = _lock(signing, pin, good.public_pem)
    report = _fetch(signing, lock, tmp_path)
    assert [(v.image, v.digest, v.key) for v in report.signatures] == \
        [(pin.ref, pin.digest, str(good.public_pem))]
    # build's check: no client at all, the signature comes from the store
    fetched = Store(tmp_path / "store")
    assert [v.digest for v in check_lock(lock, (ARCH,), fetched)] == [pin.digest]
    # ... and it is a real check: another key in the lock fails it offline
    with pytest.raises(cosign.SignatureError, match="signature does not verify with"):
        check_lock(_lock(signing, pin, signing[3].public_pem), (ARCH,), fetched)
    # a store without the signature (fetched before the lock named a key) says to fetch
    with pytest.raises(cosign.SignatureError, match="the store has none"):
        check_lock(lock, (ARCH,), Store(tmp_path / "empty"))


def test_build_refuses_an_image_whose_signature_the_store_lacks(signing, tmp_path):
    """`build` runs the offline check before it writes anything (here: nothing fetched)."""
    from builder.assemble.build import build
    from builder.lock.lockfile import Runtime
    from builder.progress import Reporter

    pin, _ref = _image(signing, "buildcheck")
    lock = replace(_lock(signing, pin, signing[2].public_pem),
                   runtime=Runtime(f"{signing[0].host}/fixtures/runtime", ("core",), (), (),
                                   no_charts="a fixture"))
    with pytest.raises(cosign.SignatureError, match="the store has none"):
        build(lock, (ARCH,), Store(tmp_path / "store"), tmp_path / "artifacts", Reporter(quiet=True))
    assert not (tmp_path / "artifacts").exists()


def test_multi_arch_image_signed_by_its_index_digest(signing, tmp_path):
    """cosign signs the digest a tag resolves to: for a multi-arch image, the index. Both arches
    fetch; the archive check accepts the index (carried as a blob) as what was signed."""
    from tests.rig.images import multi_arch

    setup, store, good, _other, _keys = signing
    layer = {a: rig_cosign_layer(store, a) for a in ("amd64", "arm64")}
    img = multi_arch(store, "fixtures/multi", "2.0", lambda a: [layer[a]], ("amd64", "arm64"),
                     "oci", with_attestation=True)
    client = setup.client(anonymous=True)
    ref = Reference(setup.host, img.repository, img.tag)
    client.push_tree(store, ref, img.top)
    rig_cosign.sign_image(client, store, good, ref, img.top.digest)
    pin = replace(img.pin(setup.host), cosign_key=str(good.public_pem))
    lock = lock_for([pin], ("amd64", "arm64"), setup.mirrors)
    fetched = Store(tmp_path / "store")
    report = pull_images(lock, ("amd64", "arm64"), fetched, client=client, quiet=True)
    assert [v.digest for v in report.signatures] == [img.top.digest]
    verified = check_lock(lock, ("amd64", "arm64"), fetched)[0]
    blobs = {d: fetched.read_bytes(d) for d in verified.blobs}
    for desc in img.manifests.values():
        assert cosign.check_archived(pin.ref, desc.digest, dict(verified.annotations()), blobs) is None
    assert "neither" in cosign.check_archived(pin.ref, "sha256:" + "3" * 64,
                                              dict(verified.annotations()), blobs)


def rig_cosign_layer(store: Store, arch: str):
    from builder.oci.layer import write_layer
    from tests.rig.images import EPOCH

    return write_layer(store, [FileEntry("etc/arch", arch.encode(), 0o644)], EPOCH)


def test_unsigned_image_is_refused_before_any_layer(signing, tmp_path):
    pin, _ref = _image(signing, "unsigned")
    text = _refused(signing, _lock(signing, pin, signing[2].public_pem), tmp_path)
    assert f"unsigned: no cosign signature {pin.reference.name}:{cosign.signature_tag(pin.digest)}" in text
    assert not (tmp_path / "store" / "blobs" / "sha256").exists() or not any(
        (tmp_path / "store" / "blobs" / "sha256").iterdir())  # nothing of the image was stored


def test_signature_by_another_key_is_refused(signing, tmp_path):
    setup, store, good, other, _keys = signing
    pin, ref = _image(signing, "otherkey")
    rig_cosign.sign_image(setup.client(anonymous=True), store, other, ref, pin.digest)
    text = _refused(signing, _lock(signing, pin, good.public_pem), tmp_path)
    assert f"signature does not verify with {good.public_pem}" in text


@pytest.mark.parametrize("case", ["digest", "repository", "type"])
def test_signed_payload_for_something_else_is_refused(signing, tmp_path, case):
    """Signed by the right key, but the claims name another digest/repository/type."""
    setup, store, good, _other, _keys = signing
    pin, ref = _image(signing, f"claims-{case}")
    claims = {"digest": (ref.name, "sha256:" + "0" * 64),
              "repository": (f"{setup.host}/fixtures/elsewhere", pin.digest),
              "type": (ref.name, pin.digest)}[case]
    data = rig_cosign.payload(*claims, kind="something else" if case == "type" else cosign.PAYLOAD_TYPE)
    rig_cosign.push_signature(setup.client(anonymous=True), store, ref, pin.digest,
                              [(data, rig_cosign.sign(good, data))])
    text = _refused(signing, _lock(signing, pin, good.public_pem), tmp_path)
    want = {"digest": f"payload names digest sha256:{'0' * 64}, expected {pin.digest}",
            "repository": f"payload names repository '{setup.host}/fixtures/elsewhere', expected {ref.name}",
            "type": "payload type 'something else'"}[case]
    assert want in text


def test_flipped_signature_bytes_are_refused(signing, tmp_path):
    setup, store, good, _other, _keys = signing
    pin, ref = _image(signing, "flipped")
    data = rig_cosign.payload(ref.name, pin.digest)
    raw = bytearray(base64.b64decode(rig_cosign.sign(good, data)))
    raw[-5] ^= 0x01
    rig_cosign.push_signature(setup.client(anonymous=True), store, ref, pin.digest,
                              [(data, base64.b64encode(bytes(raw)).decode())])
    text = _refused(signing, _lock(signing, pin, good.public_pem), tmp_path)
    assert "signature does not verify with" in text


def test_one_good_signature_among_others_is_enough(signing, tmp_path):
    """cosign appends layers: a `.sig` manifest signed by two keys verifies with either."""
    setup, store, good, other, _keys = signing
    pin, ref = _image(signing, "twokeys")
    data = rig_cosign.payload(ref.name, pin.digest)
    rig_cosign.push_signature(setup.client(anonymous=True), store, ref, pin.digest,
                              [(data, rig_cosign.sign(other, data)), (data, rig_cosign.sign(good, data))])
    assert _fetch(signing, _lock(signing, pin, good.public_pem), tmp_path).signatures


def test_registry_default_key_from_the_lock_file(signing, tmp_path):
    """`signatures:` names a key per registry host, relative to the lock's directory."""
    setup, store, good, _other, keys = signing
    pin, ref = _image(signing, "bydefault")
    rig_cosign.sign_image(setup.client(anonymous=True), store, good, ref, pin.digest)
    lock = lock_for([pin], (ARCH,), setup.mirrors)
    text = lockfile.dumps(replace(lock, signatures={setup.host: f"keys/{good.public_pem.name}"}))
    (tmp_path / "keys").mkdir()
    shutil.copy(good.public_pem, tmp_path / "keys")
    (tmp_path / "images.lock").write_text(text)
    loaded = lockfile.load(tmp_path / "images.lock")
    assert loaded.cosign_key(loaded.images[0]) == tmp_path / "keys" / good.public_pem.name
    loaded = replace(loaded, mirrors=setup.mirrors)
    assert _fetch(signing, loaded, tmp_path).signatures[0].digest == pin.digest
    # the image's own key wins over its registry's
    own = replace(loaded, images=(replace(loaded.images[0], cosign_key="nowhere.pub"),))
    with pytest.raises(cosign.SignatureError, match="nowhere.pub: cannot read it"):
        _fetch(signing, own, tmp_path)


BASE = "schema: 1\nrelease: {version: v1.0.0}\narches: [amd64]\n"
IMAGE = "images:\n- ref: reg.example/a/b:1\n  groups: [core]\n"


@pytest.mark.parametrize("text,message", [
    (IMAGE + "  cosign_key: ../keys/x.pub\n", "images[0] (reg.example/a/b:1).cosign_key: expected the path"),
    (IMAGE + "  cosign_key: /etc/x.pub\n", "expected the path of a PEM public key relative"),
    (IMAGE + "  daemon: docker-daemon:a:b\n  cosign_key: x.pub\n", "has no registry signature to check"),
    ("signatures: {}\n", "expected a mapping of registry host"),
    ("signatures: {'bad host': k.pub}\n", "expected a registry host"),
    ("signatures: {reg.example: ../k.pub}\n", "signatures.reg.example: expected the path"),
])
def test_lock_refuses_bad_key_entries_and_signatures_mappings(text, message):
    with pytest.raises(LockError, match=re.escape(message)):
        lockfile.parse(BASE + text)


@pytest.mark.parametrize("text,ok", [
    (BASE + "signatures: {reg.example: keys/k.pub, 'reg.example:5000': k.pub}\n" + IMAGE
     + "  cosign_key: keys/own.pub\n", True),
    (BASE + IMAGE + "  cosign_key: ../x.pub\n", False),
    (BASE + IMAGE + "  cosign_key: a/../../x.pub\n", False),
    (BASE + IMAGE + "  cosign_key: /etc/x.pub\n", False),
    (BASE + "signatures: {}\n", False),
    (BASE + "signatures: {'bad host': k.pub}\n", False),
    (BASE + "signatures: {reg.example: ../k.pub}\n", False),
])
def test_schema_and_validator_agree_on_key_fields(text, ok):
    from tests.test_lock_schema import schema_errors, validator_error

    assert (validator_error(text) is None) is ok
    assert (not schema_errors(text)) is ok


def test_key_that_is_not_p256_is_refused_before_any_request(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = tmp_path / "ed.pub"
    pub.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(cosign.SignatureError, match="expected an ECDSA P-256 public key"):
        cosign.load_key(pub, "reg.example/a/b:1")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(cosign.SignatureError, match="not a PEM public key"):
        cosign.load_key(tmp_path / "junk.pub", "reg.example/a/b:1")


def test_payload_keys_are_read_as_cosign_reads_them():
    """The spec's example spells Docker-manifest-digest; Go decodes case-insensitively. One key
    said twice in two spellings is ambiguous and refused."""
    digest = "sha256:" + "a" * 64
    spec = (b'{"critical":{"identity":{"docker-reference":"r"},"image":{"Docker-manifest-digest":"'
            + digest.encode() + b'"},"type":"cosign container image signature"},"optional":null}')
    assert cosign.parse_payload(spec).manifest_digest == digest
    twice = spec.replace(b'"Docker-manifest-digest"', b'"docker-manifest-digest":"x","Docker-manifest-digest"')
    with pytest.raises(ValueError, match="twice"):
        cosign.parse_payload(twice)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_openssl_verifies_the_signatures_we_make(tmp_path):
    """An independent verifier: `openssl dgst -sha256 -verify` accepts what tests/rig/cosign.py signs
    (and cosign.verify_manifest accepts), and refuses the same signature over other bytes.
    (sigstore-python cannot be that verifier: it verifies Sigstore bundles, not bare public-key
    signatures; sigstore/sigstore-python issue #1244 is open for exactly that.)"""
    signer = rig_cosign.new_signer(tmp_path)
    data = rig_cosign.payload("reg.example/a/b", "sha256:" + "b" * 64)
    (tmp_path / "payload").write_bytes(data)
    (tmp_path / "sig.der").write_bytes(base64.b64decode(rig_cosign.sign(signer, data)))
    cmd = ["openssl", "dgst", "-sha256", "-verify", str(signer.public_pem), "-signature",
           str(tmp_path / "sig.der"), str(tmp_path / "payload")]
    assert subprocess.run(cmd, capture_output=True, text=True).stdout.strip() == "Verified OK"
    (tmp_path / "payload").write_bytes(data.replace(b"b" * 64, b"c" * 64))
    assert subprocess.run(cmd, capture_output=True).returncode != 0


@pytest.fixture(scope="module")
def carried(signing, built, tmp_path_factory):
    """The session's release built again with one more image, signed and pinned with its key."""
    from builder.assemble.build import build
    from builder.progress import Reporter
    from tests.plugins.built import EPOCH

    setup, store, good, _other, _keys = signing
    pin, ref = _image(signing, "carried")
    rig_cosign.sign_image(setup.client(anonymous=True), store, good, ref, pin.digest)
    mine = replace(pin, cosign_key=str(good.public_pem))
    base = lockfile.load(built.lock)
    fetch_lock = replace(base, images=(mine,), mirrors=setup.mirrors)
    pull_images(fetch_lock, (ARCH,), Store(built.store), client=setup.client(anonymous=True),
                quiet=True)
    lock = replace(base, images=(*base.images, mine))
    out = tmp_path_factory.mktemp("carried") / "artifacts"
    build(lock, base.arches, Store(built.store), out, Reporter(quiet=True), epoch=int(EPOCH))
    return pin, ref, out


@pytest.mark.slow
def test_signature_travels_into_archives_verify_and_push_images(signing, built, carried, tmp_path):
    """A real build of the session's release plus one signed image: its archive entry names the
    signature, carries its blobs, `verify` passes; `release --push-images` (push_images) puts the
    `sha256-<hex>.sig` tag beside the image, where a site's policy finds and verifies it; a
    signature annotation whose manifest is not in the archive is reported by verify's check."""
    from builder.oci.archive import read_archive
    from builder.publish import release as rl
    from builder.trust.verify import verify_release

    setup, _store, good, _other, _keys = signing
    pin, ref, out = carried
    core = out / "rke2-images-core.linux-amd64.tar.zst"
    contents = read_archive(core, verify=True)
    entry = next(i for i in contents.images if i.name == pin.ref)
    sig = cosign.stored(Store(built.store), pin.ref, ref, pin.digest)
    assert entry.annotations[cosign.ANNOTATION_SIGNED] == pin.digest
    assert entry.annotations[cosign.ANNOTATION_SIGNATURE] == sig.digest
    assert {sig.digest, sig.config.digest, *(d.digest for d in sig.layers)} <= set(contents.json)
    report = verify_release(out)
    # (only the image archives are judged here: the release's other files are other tests' part)
    assert not [p for p in report.problems if p.file.startswith("rke2-images")], report.summary()

    # what verify says of an archive entry whose signature is not carried
    bad = dict(entry.annotations, **{cosign.ANNOTATION_SIGNATURE: "sha256:" + "1" * 64})
    assert "is not in the archive" in cosign.check_archived(pin.ref, pin.digest, bad, contents.json)
    other = dict(entry.annotations, **{cosign.ANNOTATION_SIGNED: "sha256:" + "2" * 64})
    assert "neither" in cosign.check_archived(pin.ref, pin.digest, other, contents.json)

    # verify's archive check reports it in a real archive that names a signature it lacks
    from builder.digest import of_file
    from builder.oci import model as m
    from builder.oci.archive import write_archive
    from builder.oci.layout import ArchiveImage
    from builder.trust import verify as vf

    # (the registry form, so without the zstd mode's annotation naming the registry manifest)
    plain = {k: v for k, v in bad.items() if k != REGISTRY_MANIFEST}
    lacking = tmp_path / "lacking.tar"
    write_archive(Store(built.store), [ArchiveImage(pin.ref, pin.digest, m.Platform.for_arch(ARCH),
                                                    annotations=tuple(plain.items()))], lacking, 0)
    found = vf.VerifyReport(tmp_path)
    vf._check_archive(lacking, ARCH, of_file(lacking)[0].removeprefix("sha256:"), found)
    assert [str(p) for p in found.problems] == [
        f"lacking.tar: {pin.ref}: cosign signature manifest sha256:{'1' * 64} is not in the archive"]

    client = setup.client(anonymous=True)
    result = rl.push_images(client, rl.collect(out, ["amd64"]), f"{setup.host}/site")
    pushed = rl.image_target(f"{setup.host}/site", pin.ref)
    assert any(cosign.signature_tag(pin.digest) in a.target for a in result.actions)
    # the site's view: the copy's `.sig` tag, signed by the publisher, naming the upstream image
    site = fetch_signature(client, Store(tmp_path / "site-store"), str(pushed), ref, pin.digest,
                           cosign.load_key(good.public_pem, pin.ref), str(good.public_pem), at=pushed)
    assert site.signature_manifest == sig.digest


@pytest.mark.slow
def test_containerd_imports_an_archive_carrying_a_signature(carried, containerd, tmp_path):
    """The carried blobs are in no image's tree: `ctr images import` (containerd 1.6, as the node
    imports the archives) takes the signed image as before and no `.sig` image appears."""
    from builder.oci import compress
    from builder.oci.archive import read_archive

    pin, _ref, out = carried
    core = out / "rke2-images-core.linux-amd64.tar.zst"
    # the manifest the archive ships: the registry's, or its zstd conversion (the default mode)
    shipped = next(i for i in read_archive(core).images if i.name == pin.ref).manifest_digest
    tar = compress.decompress_file(core, tmp_path / "core.tar")
    imp = containerd.ctr("images", "import", str(tar.path), timeout=120)
    assert imp.returncode == 0, imp.stderr
    images = containerd.images()
    assert images.get(pin.ref) == shipped, images
    assert not [name for name in images if name.endswith(".sig")]


@pytest.mark.parametrize("signed", [True, False])
def test_fetch_command_with_a_key_in_the_lock_file(signing, tmp_path, signed):
    """`python -m builder fetch` on a lock file whose image names a key next to it: a line saying
    the signature verified, or exit 1 with the error and hint, no traceback."""
    import subprocess
    import sys

    import yaml

    setup, store, good, _other, _keys = signing
    pin, ref = _image(signing, f"cli-{'signed' if signed else 'unsigned'}")
    if signed:
        rig_cosign.sign_image(setup.client(anonymous=True), store, good, ref, pin.digest)
    (tmp_path / "keys").mkdir()
    shutil.copy(good.public_pem, tmp_path / "keys" / "publisher.pub")
    lock = lock_for([replace(pin, cosign_key="keys/publisher.pub")], (ARCH,))
    (tmp_path / "images.lock").write_text(lockfile.dumps(lock))
    (tmp_path / "mirrors.yaml").write_text(yaml.safe_dump({"insecure": [setup.host]}))
    res = subprocess.run([sys.executable, "-m", "builder", "--lock", str(tmp_path / "images.lock"),
                          "--store", str(tmp_path / "store"), "--mirrors", str(tmp_path / "mirrors.yaml"),
                          "fetch", "--arch", ARCH], capture_output=True, text=True, cwd=tmp_path)
    key = tmp_path / "keys" / "publisher.pub"
    if signed:
        assert res.returncode == 0, res.stderr
        assert f"{pin.ref}: cosign signature of {pin.digest[:19]} by {key} verified" in res.stderr
    else:
        assert res.returncode == 1, res.stderr
        assert f"{pin.ref}: unsigned: no cosign signature" in res.stderr
        assert f"(the lock requires one by {key})" in res.stderr
        assert "hint: ask the publisher to sign the image" in res.stderr
        assert "Traceback" not in res.stderr


def test_lock_writes_pins_and_keeps_the_key_fields_as_written():
    """`lock` writing resolved pins into the file keeps `signatures:` (comment too) and
    `cosign_key`; the dump of a Lock round-trips them."""
    text = BASE + "signatures:\n  reg.example: keys/k.pub   # the vendor's key\n" + IMAGE \
        + "  cosign_key: keys/own.pub\n"
    lock = lockfile.parse(text)
    digest = "sha256:" + "a" * 64
    new = replace(lock, images=(replace(lock.images[0], digest=digest, platforms={"amd64": digest}),))
    written = lockfile.update_text(text, new)
    assert "  reg.example: keys/k.pub   # the vendor's key\n" in written
    again = lockfile.parse(written)
    assert again.signatures == {"reg.example": "keys/k.pub"}
    assert again.images[0].cosign_key == "keys/own.pub" and again.images[0].digest == digest
    assert lockfile.parse(lockfile.dumps(again)) == again
