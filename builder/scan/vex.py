"""OpenVEX documents: ``not_affected`` (and ``fixed``) statements that clear a finding.

The scan applies them itself instead of handing them to ``trivy --vex``: Trivy drops a suppressed
finding from its report, and then the summary could not say *which* statement cleared it; Trivy
also matches products only by purl, while a statement here may name the image as it appears in
the lock. Matching follows the OpenVEX spec: a statement names a vulnerability (by name or alias)
and products; a product is an image (``pkg:oci/NAME[@sha256:…]`` or its reference) or a
package purl; with ``subcomponents`` the product is the image and the subcomponents are the
packages in it. For one finding the latest matching statement wins (statement timestamp, else the
document's), so a later ``affected`` takes back an earlier ``not_affected``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from builder.scan.policy import PolicyError
from builder.store import read_named

STATUSES = ("not_affected", "affected", "fixed", "under_investigation")
CLEARING = ("not_affected", "fixed")
JUSTIFICATIONS = ("component_not_present", "vulnerable_code_not_present",
                  "vulnerable_code_not_in_execute_path",
                  "vulnerable_code_cannot_be_controlled_by_adversary",
                  "inline_mitigations_already_exist")


@dataclass(frozen=True)
class Purl:
    type: str
    namespace: str
    name: str
    version: str | None

    @classmethod
    def parse(cls, text: str) -> Purl | None:
        if not text.startswith("pkg:"):
            return None
        body = text[4:].split("#", 1)[0].split("?", 1)[0].lstrip("/")
        version = None
        if "@" in body:
            body, version = body.rsplit("@", 1)
            version = unquote(version)
        parts = [unquote(p) for p in body.split("/") if p]
        if len(parts) < 2:
            return None
        ptype = parts[0].lower()
        return cls(ptype, "/".join(parts[1:-1]).lower(), parts[-1], version)

    def covers(self, other: Purl) -> bool:
        """Does this (statement) purl name ``other`` (a finding's)? No version = any version."""
        return ((self.type, self.namespace, self.name) == (other.type, other.namespace, other.name)
                and (self.version is None or self.version == other.version))


@dataclass(frozen=True)
class Subject:
    """What a finding is about, for matching: the scanned image and the package in it."""

    image: str  # target name, e.g. docker.io/rancher/pause:3.9
    image_digest: str | None
    vuln_id: str
    package_purl: str


@dataclass(frozen=True)
class Statement:
    document: Path
    index: int
    names: frozenset[str]  # vulnerability name + aliases
    products: tuple[tuple[str, tuple[str, ...]], ...]  # (product @id, subcomponent @ids)
    status: str
    justification: str
    impact: str
    timestamp: dt.datetime

    @property
    def label(self) -> str:
        return f"{self.document.name} statements[{self.index}]"

    @property
    def reason(self) -> str:
        why = self.justification or self.impact or self.status
        if self.impact and self.justification:
            why = f"{self.justification}: {self.impact}"
        return f"VEX {self.status} ({self.label}): {why}"

    def matches(self, subject: Subject) -> bool:
        if subject.vuln_id not in self.names:
            return False
        for product, subcomponents in self.products:
            if subcomponents:
                if _names_image(product, subject) and any(
                        _names_package(s, subject) for s in subcomponents):
                    return True
            elif _names_image(product, subject) or _names_package(product, subject):
                return True
        return False


def _repo(reference: str) -> str:
    """docker.io/rancher/pause:3.9@sha256:… → docker.io/rancher/pause."""
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: name.rfind(":")]
    return name


def _names_image(product: str, subject: Subject) -> bool:
    purl = Purl.parse(product)
    if purl is not None:
        if purl.type != "oci":
            return False
        if purl.name != _repo(subject.image).rsplit("/", 1)[-1]:
            return False
        return purl.version is None or purl.version == subject.image_digest
    if "@" in product:
        _, digest = product.split("@", 1)
        return _repo(product) == _repo(subject.image) and digest == subject.image_digest
    return product == subject.image or product == _repo(subject.image)


def _names_package(product: str, subject: Subject) -> bool:
    mine = Purl.parse(product)
    theirs = Purl.parse(subject.package_purl)
    return mine is not None and theirs is not None and mine.type != "oci" and mine.covers(theirs)


def _time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _ids(value: Any, path: str, where: str) -> str:
    # OpenVEX 0.2 objects carry "@id"; 0.0.x wrote plain strings.
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, dict) and isinstance(value.get("@id"), str) and value["@id"].strip():
        return value["@id"].strip()
    raise PolicyError(f"{where}: {path}: expected a product identifier (a string or an object "
                      f"with @id), got {value!r:.80}")


def load_document(path: Path) -> list[Statement]:
    where = path.name
    try:
        data = json.loads(read_named(path, PolicyError(f"{path}: VEX document not found"), Path.read_text))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{where}: not valid JSON: {exc}", "OpenVEX documents are JSON") from None
    if not isinstance(data, dict) or not str(data.get("@context", "")).startswith("https://openvex.dev/ns"):
        raise PolicyError(f"{where}: not an OpenVEX document (no @context https://openvex.dev/ns/...)",
                          "only OpenVEX is supported")
    doc_time = _time(data.get("timestamp"))
    if doc_time is None:
        raise PolicyError(f"{where}: timestamp: expected an RFC 3339 time, got {data.get('timestamp')!r}")
    statements = data.get("statements")
    if not isinstance(statements, list):
        raise PolicyError(f"{where}: statements: expected a list")
    out = []
    for i, st in enumerate(statements):
        p = f"statements[{i}]"
        if not isinstance(st, dict):
            raise PolicyError(f"{where}: {p}: expected an object")
        vuln = st.get("vulnerability")
        if isinstance(vuln, str):
            names = {vuln}
        elif isinstance(vuln, dict) and isinstance(vuln.get("name"), str):
            names = {vuln["name"], *[a for a in vuln.get("aliases") or [] if isinstance(a, str)]}
        else:
            raise PolicyError(f"{where}: {p}.vulnerability: expected a name or an object with name")
        status = st.get("status")
        if status not in STATUSES:
            raise PolicyError(f"{where}: {p}.status: expected one of {', '.join(STATUSES)}, "
                              f"got {status!r}")
        justification = st.get("justification") or ""
        impact = st.get("impact_statement") or ""
        if status == "not_affected":
            if justification and justification not in JUSTIFICATIONS:
                raise PolicyError(f"{where}: {p}.justification: expected one of "
                                  f"{', '.join(JUSTIFICATIONS)}, got {justification!r}")
            if not justification and not impact:
                raise PolicyError(f"{where}: {p}: a not_affected statement needs a justification "
                                  "or an impact_statement", "OpenVEX requires one of them")
        products_raw = st.get("products")
        if not isinstance(products_raw, list) or not products_raw:
            raise PolicyError(f"{where}: {p}.products: expected a non-empty list")
        products = []
        for j, prod in enumerate(products_raw):
            prod_id = _ids(prod, f"{p}.products[{j}]", where)
            subs = prod.get("subcomponents") if isinstance(prod, dict) else None
            sub_ids = tuple(_ids(s, f"{p}.products[{j}].subcomponents[{k}]", where)
                            for k, s in enumerate(subs or []))
            products.append((prod_id, sub_ids))
        out.append(Statement(path, i, frozenset(names), tuple(products), status,
                             justification, impact, _time(st.get("timestamp")) or doc_time))
    return out


@dataclass(frozen=True)
class VexIndex:
    statements: tuple[Statement, ...] = ()

    @classmethod
    def load(cls, paths: tuple[Path, ...] | list[Path]) -> VexIndex:
        return cls(tuple(st for path in paths for st in load_document(path)))

    def clearing(self, subject: Subject) -> Statement | None:
        """The statement that clears this finding, if the latest matching one does."""
        matching = [st for st in self.statements if st.matches(subject)]
        if not matching:
            return None
        # Latest timestamp wins; on a tie, the one written later (document order).
        _, latest = max(enumerate(matching), key=lambda pair: (pair[1].timestamp, pair[0]))
        return latest if latest.status in CLEARING else None
