"""The receiving side: a pynetdicom Application Entity with Verification (C-ECHO) and Storage
for chest radiographs only (CR, DX for presentation, DX for processing; other SOP classes are
refused at association negotiation), who may associate (``--allow``), and the limits.

A C-STORE is streamed to ``spool/`` on disk while it arrives (pynetdicom's chunked receive:
memory does not grow with the instance), then :meth:`Store.accept` makes it durable in
``received/`` before the handler returns success. Log lines name AE titles, addresses and SOP
Instance UIDs (as results.csv does), never a dataset value.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

from pneumo_edge.errors import UsageError

CHEST_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
}
VERIFICATION = "1.2.840.10008.1.1"
#: transfer syntaxes the decoders read (pydicom + pylibjpeg): uncompressed, deflated, RLE,
#: JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000
SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91")
# storage statuses (PS3.4 B.2.3)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class Limits:
    max_pdu: int = 65536  # bytes we accept in one P-DATA PDU
    max_associations: int = 8  # simultaneous (a connection that never completes its request
    #                            holds a place until associate_timeout)
    max_instance_bytes: int = 256 * 2**20  # one received instance
    associate_timeout: float = 5.0  # seconds from connection to a complete A-ASSOCIATE-RQ
    timeout: float = 30.0  # DIMSE and network idle, seconds


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str | None = None

    def admits(self, ae_title: str, address: str) -> bool:
        return ae_title == self.ae_title and (self.host is None or address == self.host)


def parse_allow(text: str | None) -> tuple[Peer, ...]:
    """``AET[@HOST],...`` -> peers (HOST an IP address, as the connection reports it)."""
    peers = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        aet, _, host = item.partition("@")
        if not aet.strip() or len(aet.strip()) > 16:
            raise UsageError(f"--allow {item!r}: an AE title is 1 to 16 characters")
        if host:
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                raise UsageError(f"--allow {item!r}: HOST must be an IP address") from None
        peers.append(Peer(aet.strip(), host or None))
    return tuple(peers)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_ae(ae_title: str, limits: Limits):
    """The AE: Verification and the chest radiograph Storage classes, with ``limits``."""
    from pynetdicom import AE, _config

    _config.STORE_RECV_CHUNKED_DATASET = True  # spool to disk, not memory
    _config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's own log lines can quote datasets
    pn = logging.getLogger("pynetdicom")
    pn.handlers[:] = [logging.NullHandler()]
    pn.propagate = False
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = limits.max_pdu
    ae.maximum_associations = limits.max_associations
    ae.acse_timeout = limits.associate_timeout
    ae.dimse_timeout = ae.network_timeout = limits.timeout
    ae.add_supported_context(VERIFICATION)
    for uid in CHEST_CLASSES:
        ae.add_supported_context(uid, list(SYNTAXES))
    return ae


class Handlers:
    """The event handlers: who may associate, C-ECHO, C-STORE into ``store``; ``on_stored``
    is called after each new instance is durable."""

    def __init__(self, store, allow: tuple[Peer, ...], limits: Limits, on_stored, log):
        self.store, self.allow, self.limits = store, allow, limits
        self.on_stored, self.log = on_stored, log

    def bindings(self):
        from pynetdicom import evt

        return [(evt.EVT_REQUESTED, self.requested), (evt.EVT_C_ECHO, self.echo),
                (evt.EVT_C_STORE, self.stored)]

    def requested(self, event) -> None:
        rq = event.assoc.requestor  # its ae_title is filled in later, by the negotiation
        aet, addr = str(rq.primitive.calling_ae_title or "").strip(), str(rq.address)
        if self.allow and not any(p.admits(aet, addr) for p in self.allow):
            self.log(f"refused association: calling AE {aet!r} from {addr} is not in --allow")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, calling AE not recognised
            return
        self.log(f"association from {aet!r} at {addr}")

    def echo(self, event) -> int:
        return SUCCESS

    def stored(self, event) -> int:
        rq = event.request
        kind = CHEST_CLASSES.get(str(rq.AffectedSOPClassUID), "?")
        path = event.dataset_path
        from pneumo_edge.dicomnode.store import instance_name

        name = instance_name(rq.AffectedSOPInstanceUID)
        if name is None:
            self.log(f"refused a {kind} instance: its SOP Instance UID is not a valid UID")
            return CANNOT_UNDERSTAND
        size = os.path.getsize(path)
        if size > self.limits.max_instance_bytes:
            self.log(f"refused {name}: {size} bytes, over the {self.limits.max_instance_bytes} "
                     "byte limit per instance")
            return OUT_OF_RESOURCES
        try:
            new = self.store.accept(path, name)
        except OSError as exc:
            self.log(f"refused {name}: cannot store it ({exc.strerror or type(exc).__name__})")
            return OUT_OF_RESOURCES
        self.log(f"received {name} ({kind}, {size} bytes)" if new
                 else f"received {name} again: already stored, not scored twice")
        if new:
            self.on_stored()
        return SUCCESS
