"""Guards that had no test able to fail: breaking the check on purpose must break a test here.

- an image whose config names fewer diff_ids than its manifest has layers (served by a real
  registry) is refused by the pull before any layer is fetched;
- a member taken from an archive is cached per archive + member: a later build gets it from
  the store's index without reading the archive again.
"""

from __future__ import annotations

import pytest

from builder.errors import BuilderError
from builder.fetch.images import pull_images
from builder.fetch.registry import ClientOptions, RegistryClient
from builder.fetch.transport import RetryPolicy
from builder.fetch.unpack import extract_members
from builder.lock.lockfile import Mirrors
from builder.oci import model as m
from builder.oci.image import build_image, image_config
from builder.oci.layer import FileEntry, write_layer
from builder.oci.reference import Reference
from builder.store import Store
from tests.rig import payloads
from tests.rig.images import EPOCH, FixtureImage, lock_for


def _short_config_image(store: Store) -> tuple[m.Descriptor, list[str]]:
    """A linux/amd64 manifest with two layers whose config lists only the first one's diff_id
    (what a registry the attacker controls can serve: every digest is right, the image is not)."""
    layers = [write_layer(store, [FileEntry(f"etc/layer{i}", f"layer {i}\n".encode(), 0o644)], EPOCH)
              for i in range(2)]
    honest = build_image(store, layers, m.Platform.for_arch("amd64"), EPOCH)
    manifest = m.parse_document(store.read_bytes(honest.digest), "honest manifest")
    assert isinstance(manifest, m.Manifest)
    config_raw = m.canonical_json(image_config(layers[:1], m.Platform.for_arch("amd64"), EPOCH))
    config = m.Descriptor(m.OCI_CONFIG, store.put_bytes(config_raw), len(config_raw))
    raw = m.canonical_json({"schemaVersion": 2, "mediaType": m.OCI_MANIFEST,
                            "config": config.to_json(),
                            "layers": [layer.to_json() for layer in manifest.layers]})
    desc = m.Descriptor(m.OCI_MANIFEST, store.put_bytes(raw), len(raw),
                        platform=m.Platform.for_arch("amd64"))
    return desc, [layer.digest for layer in layers]


def test_pull_refuses_config_with_fewer_diff_ids_than_layers(registry, tmp_path):
    src = Store(tmp_path / "src")
    desc, layer_digests = _short_config_image(src)
    client = RegistryClient(mirrors=Mirrors(insecure=(registry.host,)),
                            options=ClientOptions(policy=RetryPolicy(attempts=2, backoff=0.01)))
    image = FixtureImage("fixtures/short-config", "1", desc, {"amd64": desc})
    client.push_tree(src, Reference(registry.host, image.repository, image.tag), desc)

    store = Store(tmp_path / "store")
    with pytest.raises(BuilderError) as err:
        pull_images(lock_for([image.pin(registry.host)], ("amd64",), client.mirrors), ["amd64"],
                    store, client=client, quiet=True)
    assert str(err.value) == (f"{image.ref(registry.host)} (amd64): 2 layers but 1 diff_ids "
                              "in the config")
    # Refused in the document phase: no layer of the inconsistent image was fetched.
    assert not any(store.has(d) for d in layer_digests)


def test_archive_member_is_taken_from_the_cache_without_the_archive(tmp_path):
    """The second extraction must not need the archive: it is deleted from the store between
    the two runs, and the members still come back (from the store's ``members`` index)."""
    store = Store(tmp_path / "store")
    deb = payloads.deb("runc", "amd64")
    archive = store.put_bytes(deb.path.read_bytes())
    members = ["./usr/sbin/runc", "./usr/bin/runc"]  # a file and a link to it
    first = extract_members(store, archive, "deb", members, "components.runc.amd64")
    want = payloads.binary("runc", "amd64").read_bytes()
    assert {store.read_bytes(d) for d in first.values()} == {want}

    store.blob_path(archive).unlink()
    assert extract_members(store, archive, "deb", members, "components.runc.amd64") == first
    # Not vacuous: a member never taken before does need the archive, which is gone.
    with pytest.raises(BuilderError, match=f"{archive} is not in the content store"):
        extract_members(store, archive, "deb", ["./usr/share/doc/runc/copyright"], "x")
