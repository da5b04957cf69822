"""Authenticated registry set-ups: TLS + htpasswd, and token auth with a small JWT issuer.

- ``TestCA``: a CA made with ``cryptography``; issues server certs for 127.0.0.1 / localhost.
- ``BasicRegistry``: docker-registry over TLS with ``auth.htpasswd`` (bcrypt lines from
  ``htpasswd -Bbn``, which distribution requires).
- ``TokenIssuer``: an HTTPS server on loopback that checks Basic credentials and answers
  ``GET /token?service=&scope=`` with an ES256 JWT carrying the granted ``access``. The JWT
  header carries ``x5c`` (the signing certificate); distribution 2.8 verifies that chain against
  ``rootcertbundle``. ``ttl`` can be negative to hand out already-expired tokens.

  Why not a real one: the CNCF distribution registry (Debian's ``docker-registry``) has no token
  issuer built in. Its ``auth.token`` mode only *verifies* JWTs from an external authorization
  server (Docker Hub's auth service, Harbor's core, GitLab's, docker_auth), and none of those is
  installable here as a package. The token specification makes the issuer the small, separate
  piece: it checks Basic credentials and signs a JWT naming the granted scopes. This one does only
  that, and the registry it serves is the real one, which checks every signature, expiry and
  scope; tests also take its ``requests`` log (scope, service, user; no secrets) as evidence of
  which token requests were made.
- ``TokenRegistry``: docker-registry over TLS with ``auth.token`` pointing at the issuer.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import secrets
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.rig import httpd
from tests.rig.registry import Registry

SERVICE = "rig-registry"
ISSUER = "rig-token-issuer"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class TestCA:
    __test__ = False  # not a pytest class
    dir: Path
    key: ec.EllipticCurvePrivateKey = field(init=False)
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name("rig test CA")).issuer_name(_name("rig test CA"))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    def issue(self, name: str, server: bool = True) -> tuple[Path, Path, x509.Certificate,
                                                             ec.EllipticCurvePrivateKey]:
        """A leaf certificate (for 127.0.0.1 and localhost when ``server``), as files."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path, cert, key


def htpasswd_line(user: str, password: str) -> str:
    done = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True)
    return done.stdout.decode().strip()


def _tls(ca: TestCA, name: str) -> dict:
    cert, key, _, _ = ca.issue(name)
    return {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}


def basic_registry(work: Path, ca: TestCA, users: dict[str, str]) -> Registry:
    work.mkdir(parents=True, exist_ok=True)
    htpasswd = work / "htpasswd"
    htpasswd.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in users.items()))
    extra = _tls(ca, "basic-registry")
    extra["auth"] = {"htpasswd": {"realm": "rig-basic", "path": str(htpasswd)}}
    return Registry(work=work, extra_config=extra, scheme="https", ca_file=ca.ca_file)


def token_registry(work: Path, ca: TestCA, issuer: TokenIssuer) -> Registry:
    work.mkdir(parents=True, exist_ok=True)
    extra = _tls(ca, "token-registry")
    extra["auth"] = {"token": {"realm": f"{issuer.url}/token", "service": SERVICE,
                               "issuer": ISSUER, "rootcertbundle": str(issuer.cert_file)}}
    return Registry(work=work, extra_config=extra, scheme="https", ca_file=ca.ca_file)


# ---------------------------------------------------------------------------------------------
# Token issuer
# ---------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(claims: dict, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> str:
    header = {"typ": "JWT", "alg": "ES256",
              "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass
class TokenIssuer:
    """``acl`` maps user (or ``""`` for anonymous) → {repository: allowed actions}; ``*`` matches all."""

    work: Path
    ca: TestCA
    users: dict[str, str]
    acl: dict[str, dict[str, tuple[str, ...]]]
    ttl: float = 300.0  # JWT lifetime (negative: already expired)
    advertised_ttl: float | None = None  # what ``expires_in`` claims (None: the real ttl)
    requests: list[dict] = field(default_factory=list)  # what was asked (scope, user), no secrets
    _server: ThreadingHTTPServer | None = field(default=None, init=False)

    @property
    def cert_file(self) -> Path:
        return self.work / "token-signer.crt"

    @property
    def url(self) -> str:
        return httpd.url(self._server, "https")

    def start(self) -> TokenIssuer:
        self.work.mkdir(parents=True, exist_ok=True)
        # The signing key's certificate goes in the registry's rootcertbundle (self-contained).
        _, _, sign_cert, sign_key = self.ca.issue("token-signer", server=False)
        self._sign = (sign_key, sign_cert)
        self.cert_file.write_bytes(sign_cert.public_bytes(serialization.Encoding.PEM)
                                   + self.ca.cert.public_bytes(serialization.Encoding.PEM))
        tls_cert, tls_key, _, _ = self.ca.issue("token-issuer")
        issuer = self

        class Handler(httpd.Quiet):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                issuer._handle(self)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_cert, tls_key)
        self._server = httpd.serve(Handler, tls=ctx)
        return self

    def stop(self) -> None:
        httpd.shutdown(self._server)
        self._server = None

    def _user(self, handler: BaseHTTPRequestHandler) -> str | None:
        """"" for anonymous, the user name, or None for wrong credentials."""
        header = handler.headers.get("Authorization") or ""
        if not header.startswith("Basic "):
            return ""
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        return user if self.users.get(user) == password else None

    def _granted(self, user: str, scope: str) -> dict | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        rules = self.acl.get(user, {})
        allowed = rules.get(name, rules.get("*", ()))
        granted = [a for a in actions.split(",") if a in allowed]
        return {"type": "repository", "name": name, "actions": granted}

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        user = self._user(handler)
        self.requests.append({"user": user, "scope": query.get("scope", []),
                              "service": query.get("service", [None])[0]})
        if user is None:
            handler.send_response(401)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        access = [g for s in query.get("scope", []) if (g := self._granted(user, s))]
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user, "aud": query.get("service", [SERVICE])[0],
                  "exp": int(now + self.ttl), "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        token = sign_jwt(claims, *self._sign)
        body = json.dumps({"token": token, "access_token": token,
                           "expires_in": max(int(self.advertised_ttl or self.ttl), 1), "issued_at":
                           dt.datetime.now(dt.UTC).isoformat()}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
