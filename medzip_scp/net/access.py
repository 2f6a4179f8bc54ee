"""Who may associate with the node and what each calling AE may ask of it."""

from __future__ import annotations

import ipaddress
import logging

from pynetdicom.association import Association

from medzip_scp.config import AccessSettings, PeerAE, Right

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)


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

    def allows(self, assoc: Association, right: Right) -> bool:
        allowed = right in self.rights(assoc.requestor.ae_title, assoc.requestor.address)
        if not allowed:
            log.warning(
                "refused %s for calling AE %r from %s: no such right",
                right.value,
                assoc.requestor.ae_title,
                assoc.requestor.address,
            )
        return allowed

    def association_rejection(
        self, calling_ae_title: str, called_ae_title: str, host: str
    ) -> tuple[int, int, int] | None:
        """The A-ASSOCIATE-RJ reason for a request, or None to go on negotiating."""
        if self.settings.check_called_ae and called_ae_title.strip() != self.our_ae_title:
            return REJECT_CALLED_AE
        if not self.rights(calling_ae_title, host):
            return REJECT_CALLING_AE
        return None
