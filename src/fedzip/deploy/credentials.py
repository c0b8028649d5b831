"""Credentials for a secure deployment: a CA, the SuperLink's TLS certificate, and SuperNode key pairs.

    fedzip deploy credentials --out creds --nodes 3 --host superlink.example.org

writes ``ca.crt`` (give it to every SuperNode and to whoever runs ``flwr``), ``ca.key`` (keep it
offline), ``superlink.crt``/``superlink.key`` (the SuperLink's), and ``node<i>.key``/``node<i>.pub``
(SuperNode i keeps its private key; the SuperLink's operator registers the ``.pub`` with
``flwr supernode register``). Good for trying things out; an organisation's own PKI is better.

The folder is created 0700 and every private key 0600 from its first byte (never readable by others, not even
for an instant); an existing file is never replaced unless ``force`` (``--force``): a second run must not
silently swap the CA that every SuperNode trusts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedzip.errors import ConfigError


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedzip"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, data: bytes, mode: int) -> None:
    """A new file created with ``mode`` (O_EXCL: an existing one is an error, never overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_key(path: Path, key, fmt=serialization.PrivateFormat.PKCS8) -> None:
    _write(path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()), 0o600)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_credentials(out: Path, nodes: int, hosts: list[str], days: int = 365, force: bool = False) -> dict[str, Path]:
    out = Path(out)
    names = ["ca.crt", "ca.key", "superlink.crt", "superlink.key", *(f"node{i}.{e}" for i in range(nodes)
                                                                     for e in ("key", "pub"))]
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise ConfigError(f"{out} already holds {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''}; "
                          "replacing a CA or a key cuts off everyone who trusts it: use another folder, or --force")
    for n in existing:
        (out / n).unlink()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    now = dt.datetime.now(dt.timezone.utc)
    valid = dict(not_valid_before=now - dt.timedelta(minutes=5), not_valid_after=now + dt.timedelta(days=days))

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedzip CA")).issuer_name(_name("fedzip CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys(["localhost", "127.0.0.1", *hosts]))
    cert = (x509.CertificateBuilder().subject_name(_name(names[-1])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))

    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key",
             "server_cert": out / "superlink.crt", "server_key": out / "superlink.key"}
    _write(paths["ca_cert"], ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_key(paths["ca_key"], ca_key)
    _write(paths["server_cert"], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_key(paths["server_key"], key)

    for i in range(nodes):  # SuperNode authentication: EC key pairs, public half in OpenSSH format
        node_key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = out / f"node{i}.key", out / f"node{i}.pub"
        _write_key(priv, node_key, serialization.PrivateFormat.OpenSSH)
        _write(pub, node_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH) + b"\n", 0o644)
        paths[f"node{i}_key"], paths[f"node{i}_pub"] = priv, pub
    return paths
