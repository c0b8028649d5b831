"""Credentials for a secure deployment: a CA, the SuperLink's TLS certificate, and SuperNode key pairs.

    fedzip deploy credentials --out creds --nodes 3 --host superlink.example.org

writes ``ca.crt`` (give it to every SuperNode and to whoever runs ``flwr``), ``ca.key`` (keep it
offline), ``superlink.crt``/``superlink.key`` (the SuperLink's), and ``node<i>.key``/``node<i>.pub``
(SuperNode i keeps its private key; the SuperLink's operator registers the ``.pub`` with
``flwr supernode register``). Good for trying things out; an organisation's own PKI is better.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedzip"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_credentials(out: Path, nodes: int, hosts: list[str], days: int = 365) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
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
    paths["ca_cert"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["ca_key"], ca_key)
    paths["server_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server_key"], key)

    for i in range(nodes):  # SuperNode authentication: EC key pairs, public half in OpenSSH format
        node_key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = out / f"node{i}.key", out / f"node{i}.pub"
        priv.write_bytes(node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()))
        priv.chmod(0o600)
        pub.write_bytes(node_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                           serialization.PublicFormat.OpenSSH) + b"\n")
        paths[f"node{i}_key"], paths[f"node{i}_pub"] = priv, pub
    return paths
