"""Who may associate with the node and what each calling AE may ask of it."""

from __future__ import annotations

import ipaddress
import logging
from typing import NamedTuple

from pynetdicom.association import Association

from medzip_scp.config import AccessSettings, PeerAE, Right

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
_SEE_EXAMPLE = "(see `medzip config example`)"


class Rejection(NamedTuple):
    """Why an association is rejected: the A-ASSOCIATE-RJ fields and, for the log, the
    reason in words with the setting that would let it in."""

    fields: tuple[int, int, int]
    reason: str


def _host_in(host: str, networks: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    for item in networks:
        try:
            if address in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            continue
    return False


class AccessPolicy:
    """Allow-list of calling AEs with per-AE rights, called-AE and host checks."""

    def __init__(self, settings: AccessSettings, our_ae_title: str) -> None:
        self.settings = settings
        self.our_ae_title = our_ae_title

    def _peer(self, calling_ae_title: str) -> PeerAE | None:
        for peer in self.settings.peers:
            if peer.ae_title == calling_ae_title.strip():
                return peer
        return None

    def rights(self, calling_ae_title: str, host: str) -> frozenset[Right]:
        """What this AE, calling from this host, may do (empty: nothing)."""
        peer = self._peer(calling_ae_title)
        if peer is not None:
            if peer.hosts and not _host_in(host, peer.hosts):
                return frozenset()
            return frozenset(peer.rights)
        if self.settings.allow_unknown_ae and _host_in(host, self.settings.unknown_ae_hosts):
            return frozenset(self.settings.unknown_ae_rights)
        return frozenset()

    def refusal(self, calling_ae_title: str, host: str) -> str | None:
        """Why this AE, calling from this host, may do nothing, naming the setting to
        change; None when it has rights."""
        calling = calling_ae_title.strip()
        peer = self._peer(calling)
        if peer is not None:
            if peer.hosts and not _host_in(host, peer.hosts):
                return (
                    f"calling AE {calling!r} may call from {', '.join(peer.hosts)} only, not "
                    f"from {host}; add the address to its hosts under [[access.peers]]"
                )
            if not peer.rights:
                return (
                    f"calling AE {calling!r} has no rights under [[access.peers]]; add some "
                    f"to its rights {_SEE_EXAMPLE}"
                )
            return None
        access = self.settings
        if not access.allow_unknown_ae:
            return (
                f"calling AE {calling!r} is not in [[access.peers]] and allow_unknown_ae = "
                f"false; add it under [[access.peers]] {_SEE_EXAMPLE}"
            )
        if not _host_in(host, access.unknown_ae_hosts):
            return (
                f"calling AE {calling!r} is not in [[access.peers]] and {host} is not in "
                f"[access] unknown_ae_hosts; add the AE under [[access.peers]] or its network "
                f"to unknown_ae_hosts {_SEE_EXAMPLE}"
            )
        if not access.unknown_ae_rights:
            return (
                f"calling AE {calling!r} is not in [[access.peers]] and [access] "
                f"unknown_ae_rights is empty; add it under [[access.peers]] {_SEE_EXAMPLE}"
            )
        return None

    def allows(self, assoc: Association, right: Right) -> bool:
        calling = assoc.requestor.ae_title.strip()
        allowed = right in self.rights(calling, assoc.requestor.address)
        if not allowed:
            where = (
                "its rights under [[access.peers]]"
                if self._peer(calling) is not None
                else "[access] unknown_ae_rights, or add the AE under [[access.peers]]"
            )
            log.warning(
                "refused %s for calling AE %r from %s: it lacks the right %r; add it to %s",
                right.value,
                calling,
                assoc.requestor.address,
                right.value,
                where,
            )
        return allowed

    def association_rejection(
        self, calling_ae_title: str, called_ae_title: str, host: str
    ) -> Rejection | None:
        """Why a request is rejected, or None to go on negotiating."""
        called = called_ae_title.strip()
        if self.settings.check_called_ae and called != self.our_ae_title:
            return Rejection(
                REJECT_CALLED_AE,
                f"called AE {called!r} is not ours ({self.our_ae_title!r}, [node] ae_title); "
                "the peer must call that title, or set [access] check_called_ae = false",
            )
        reason = self.refusal(calling_ae_title, host)
        if reason is not None:
            return Rejection(REJECT_CALLING_AE, reason)
        return None
