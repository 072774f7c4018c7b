"""A throwaway certificate authority for the TLS tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def make_certificates(
    folder: Path, clients: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Path]:
    """A test CA and certificates it signs, as PEM files in ``folder``: ``ca``; ``server`` (for
    127.0.0.1 and localhost) and the clients ``edge`` and ``orchestrator`` (``*.crt``/``*.key``
    pairs, keys by name + ``_key``); and ``rogue`` (a client certificate from another CA).
    ``clients``: more client certificates of the CA, by name, each carrying these subject
    alternative names (a URI where the name has ``://``, else a DNS name)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, Path] = {}

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        paths[name] = folder / f"{name}.crt"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def authority(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def leaf(
        name: str,
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        server: bool,
        sans: Sequence[str] = (),
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca[0].subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        elif sans:
            general: list[x509.GeneralName] = [
                x509.UniformResourceIdentifier(s) if "://" in s else x509.DNSName(s) for s in sans
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
        write(name, builder.sign(ca[1], hashes.SHA256()), key)

    ca = authority("tokenrelay test CA")
    write("ca", *ca)
    leaf("server", ca, server=True)
    leaf("edge", ca, server=False)
    leaf("orchestrator", ca, server=False)
    leaf("rogue", authority("someone else"), server=False)
    for name, sans in (clients or {}).items():
        leaf(name, ca, server=False, sans=sans)
    return paths
