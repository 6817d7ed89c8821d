"""``pneumo-edge listen``: the wiring. Open the model, repair ``--out DIR`` after any crash,
start the network process (the DICOM server and the sender,
:mod:`pneumo_edge.dicomnode.network`), score batches in the main thread until SIGTERM/SIGINT;
then stop accepting, wait for open associations, score everything accepted, try the outbox once
more, exit 0. One log line per event on stderr, from either process."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

from pneumo_edge.commands.options import SCORE_DEFAULTS
from pneumo_edge.dicomnode.logline import stamped
from pneumo_edge.dicomnode.scp import Limits
from pneumo_edge.errors import UsageError


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class NodeConfig:
    """The ``listen`` options; a field with a default states it once, with the CLI's help."""

    model: str
    out: str
    port: int = _opt(11112, "TCP port to listen on.")
    ae_title: str = _opt("PNEUMO_EDGE", "This node's AE title (the called AE title).")
    host: str = _opt("127.0.0.1", "Address to bind; anything but loopback needs --allow.")
    allow: str | None = _opt(None, "The calling AE titles (each optionally @ an IP address) "
                             "that may associate; everyone else is refused and logged. Default: "
                             "any AE title (loopback only).")
    send_to: str | None = _opt(None, "C-STORE the results (SR, SC) there, "
                               "retried with back-off until sent. Default: keep them in "
                               "OUT/dicom.")
    explain: bool = _opt(False, "Also send an occlusion heatmap Secondary Capture per "
                         "scored instance (about 226 model calls each).")
    batch: int = _opt(16, "Instances per scoring batch.")
    max_wait: float = _opt(2.0, "Seconds the oldest received instance waits for a fuller "
                           "batch.")
    runtime: str = _opt("auto", "auto picks what score would pick.")
    qc: str = _opt(SCORE_DEFAULTS.qc, "Input quality gate, as score's: flag (keep the label, "
                   "reasons in results.csv's qc column and in the SR), refuse (flagged "
                   "instances become error rows and get no SR) or off.")
    limits: Limits = field(default_factory=Limits)


def check(cfg: NodeConfig):
    """(allowed peers, destination or None); UsageError (exit 2) for bad options."""
    from pneumo_edge.dicomnode.outbox import Destination
    from pneumo_edge.dicomnode.scp import is_loopback, parse_allow

    if not 0 < cfg.port < 65536:
        raise UsageError(f"--port {cfg.port}: not a TCP port")
    if not cfg.ae_title.strip() or len(cfg.ae_title) > 16:
        raise UsageError(f"--ae-title {cfg.ae_title!r}: an AE title is 1 to 16 characters")
    if cfg.batch < 1 or cfg.max_wait < 0:
        raise UsageError("--batch must be at least 1 and --max-wait at least 0")
    allow = parse_allow(cfg.allow)
    if not allow and not is_loopback(cfg.host):
        raise UsageError(f"--host {cfg.host}: listening beyond this machine needs --allow "
                         "(the calling AE titles that may send)")
    return allow, Destination.parse(cfg.send_to) if cfg.send_to else None


def run_node(cfg: NodeConfig) -> int:
    """Run until SIGTERM or SIGINT; returns the exit code (1 when the network process died)."""
    log = stamped
    allow, dest = check(cfg)
    from pneumo_edge.dicomnode.network import NetworkProcess
    from pneumo_edge.dicomnode.worker import wait_for_batch

    store, worker, builder = _scoring_side(cfg, dest, log)
    stop, arrived, gone = threading.Event(), threading.Event(), []

    def network_gone(code: int) -> None:
        gone.append(code)
        log(f"error: the DICOM network process exited (code {code}); stopping, finishing "
            "what was accepted")
        stop.set()
        arrived.set()

    _on_signals(stop, arrived, log)
    network = NetworkProcess(cfg, arrived.set, network_gone)
    try:
        network.wait_ready()
        who = ", ".join(f"{p.ae_title}@{p.host}" if p.host else p.ae_title for p in allow)
        log(f"listening as {cfg.ae_title} on {cfg.host}:{cfg.port}; allowed: "
            f"{who or 'any AE title'}; results to {dest or (store.out / 'dicom')}")
        _serve(store, worker, network, cfg, stop, arrived, wait_for_batch, log)
    finally:
        network.finish()
        worker.close()
        builder.close()
    log("stopped")
    return 1 if gone else 0


def _scoring_side(cfg: NodeConfig, dest, log):
    """(store, worker, builder process): the model opened, ``--out`` repaired, the builder
    started."""
    from pneumo_edge.commands.score import _open
    from pneumo_edge.dicomnode.builder import BuilderProcess
    from pneumo_edge.dicomnode.store import Store
    from pneumo_edge.dicomnode.worker import Worker
    from pneumo_edge.model.qc import uncalibrated_notice

    store = Store(cfg.out)
    rt = _open(cfg.model, cfg.runtime, log)
    note = uncalibrated_notice(rt.card, cfg.model)
    if note:
        log(note)
    builder = BuilderProcess()
    try:
        worker = Worker(store, rt, send=dest is not None, explain=cfg.explain, log=log,
                        qc=cfg.qc, builder=builder)
    except BaseException:
        builder.close()
        raise
    waiting = sum(1 for _ in (store.out / "outbox").rglob("*.dcm"))
    if waiting and not dest:
        log(f"note: {waiting} objects wait in {store.out / 'outbox'} from a run with --send-to; "
            "they are sent when the node runs with --send-to again")
    return store, worker, builder


def _serve(store, worker, network, cfg, stop, arrived, wait_for_batch, log) -> None:
    """Score batches here while a :class:`Committer` thread commits the one before (builds
    and writes its objects, appends its rows, moves its files), then tells the network
    process's sender."""
    from pneumo_edge.dicomnode.committer import Committer

    def done(batch, rows, seconds: float) -> None:
        failed = sum(1 for r in rows if not r[1])
        flagged = sum(1 for r in rows if r[worker.qc_column])
        log(f"scored {len(rows)} instances in {batch.seconds:.2f} s, committed in "
            f"{seconds:.2f} s" + (f" ({failed} could not be scored; see results.csv)"
                                  if failed else "")
            + (f"; qc flagged {flagged} (see the qc column)" if flagged else ""))
        if worker.send:
            network.kick()

    def failed() -> None:
        stop.set()
        arrived.set()

    committer = Committer(worker, done, failed)
    stopping = False
    try:
        while True:
            if stop.is_set() and not stopping:
                stopping = True
                log("stopping: no new associations; finishing what was accepted")
                network.stop_accepting(cfg.limits.timeout + 5)
            files = wait_for_batch(store, cfg.batch, cfg.max_wait, stop, arrived,
                                   committer.busy)
            if files:
                committer.submit(worker.run(files))
            elif stopping:
                committer.drain()
                return
    finally:
        committer.close()


def _on_signals(stop, arrived, log) -> None:
    def handler(signum, frame):
        if not stop.is_set():
            log(f"received {signal.Signals(signum).name}")
        stop.set()
        arrived.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
