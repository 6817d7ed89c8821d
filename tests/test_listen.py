"""``pneumo-edge listen``, the DICOM node, as a subprocess: against a real PACS (Orthanc, started
by tests/pacs.py) and a pynetdicom client; real SIGKILLs at every step of the commit order,
restarts, and checks that every acknowledged instance got one row and one delivered SR."""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

pynetdicom = pytest.importorskip("pynetdicom")
pydicom = pytest.importorskip("pydicom")
from pacs import NODE_AET, ORTHANC_AET, Orthanc, free_port, orthanc  # noqa: F401
from test_dicom import PHI_ID, PHI_NAME, make, picture

from pneumo_edge.dicomnode.store import KILL_AT
from pneumo_edge.outputs.dicom_objects import read_result

REPO = Path(__file__).resolve().parents[1]
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"
CR_CLASS, CT_CLASS = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2"
pytestmark = pytest.mark.slow


# --- test DICOMs --------------------------------------------------------------------------------

def xray(path: Path, i: int, *, cr: bool = False) -> Path:
    """A 12-bit DX (or CR) chest radiograph with PHI in its header, from sample X-ray ``i``."""
    make(path, picture(i % 4).astype(np.uint16) * 16)
    if cr:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_CLASS
        ds.Modality = "CR"
        ds.save_as(path, enforce_file_format=True)
    return path


def no_pixels(path: Path) -> Path:
    xray(path, 0)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def multi_frame(path: Path) -> Path:
    xray(path, 1)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(path, enforce_file_format=True)
    return path


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --- the node as a subprocess -------------------------------------------------------------------

class Node:
    """``pneumo-edge listen`` in a subprocess; its stderr lines collected as they come."""

    def __init__(self, model: Path, out: Path, port: int, *args: str, env=None):
        cmd = [sys.executable, "-m", "pneumo_edge", "listen", "--model", str(model), "--out",
               str(out), "--port", str(port), "--max-wait", "0.3", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.port, self.lines = port, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for("listening as")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for ln in self.lines if re.search(pattern, ln)) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {count} x {pattern!r} in the node's log:\n" +
                             "\n".join(self.lines[-30:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._reader.join(5)
        return code

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


def store(port: int, files, aet: str = "MODALITY") -> list[int | None]:
    """C-STORE ``files`` to the node; the status of each (None: no answer)."""
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for uid in ("1.2.840.10008.5.1.4.1.1.1.1", CR_CLASS):
        ae.add_requested_context(uid, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    if not assoc.is_established:
        return [None] * len(files)
    out = []
    for f in files:
        try:
            out.append(getattr(assoc.send_c_store(f), "Status", None))
        except Exception:  # noqa: BLE001 -- the node died mid-association
            out.append(None)
    if assoc.is_established:
        assoc.release()
    return out


def store_until_ok(port: int, files, tries: int = 3) -> None:
    """Send ``files`` as a PACS does: those without a success status again."""
    left = list(files)
    for _ in range(tries):
        left = [f for f, s in zip(left, store(port, left)) if s != 0]
        if not left:
            return
    raise AssertionError(f"{len(left)} instances never acknowledged")


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def echo(port: int, aet: str = "MODALITY"):
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    try:
        return assoc.send_c_echo().Status if assoc.is_established else None
    finally:
        if assoc.is_established:
            assoc.release()


def score_table(model: Path, files, tmp_path: Path, *args: str) -> list[dict]:
    """``pneumo-edge score`` on ``files`` (with ``args``): its CSV's rows."""
    out = tmp_path / "score.csv"
    subprocess.run([sys.executable, "-m", "pneumo_edge", "score", *map(str, files), "--model",
                    str(model), "-o", str(out), "-q", *args], cwd=REPO, check=False)
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def score_csv(model: Path, files, tmp_path: Path) -> dict[str, float]:
    """``pneumo-edge score`` on ``files``: SOP Instance UID -> p_PNEUMONIA."""
    return {r["sop_uid"]: float(r["p_PNEUMONIA"]) for r in score_table(model, files, tmp_path)}


def wait_until(check, timeout: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def orthanc_srs(pacs: Orthanc) -> dict[str, dict]:
    """Orthanc's SRs: source SOP Instance UID -> what the SR records (and its study)."""
    import io

    out = {}
    for i in pacs.by_class(SR_CLASS):
        res = read_result(io.BytesIO(pacs.file(i)))
        out[res["source_sop_uid"]] = res
    return out


# --- against Orthanc ----------------------------------------------------------------------------

def test_orthanc_round_trip_sr_and_sc_in_the_study(orthanc, tiny_exported, tmp_path):  # noqa: F811
    pacs = orthanc
    files = [xray(tmp_path / "dx.dcm", 0), xray(tmp_path / "cr.dcm", 1, cr=True)]
    ids = [pacs.upload(f) for f in files]
    originals = {i: pacs.file(i) for i in ids}
    node = Node(tiny_exported, tmp_path / "node", pacs.node_port, "--allow", ORTHANC_AET,
                "--send-to", pacs.send_to, "--explain")
    try:
        assert pacs.send_to_node(ids)["FailedInstancesCount"] == 0
        wait_until(lambda: len(pacs.by_class(SR_CLASS)) == 2 and len(pacs.by_class(SC_CLASS)) == 2,
                   what="2 SRs and 2 SCs in Orthanc")
    finally:
        assert node.stop() == 0
    expected = score_csv(tiny_exported, files, tmp_path)
    srs = orthanc_srs(pacs)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sr = srs[str(ds.SOPInstanceUID)]
        assert sr["study_uid"] == str(ds.StudyInstanceUID)
        assert abs(sr["probability"] - expected[str(ds.SOPInstanceUID)]) <= 1e-6
    for sc in pacs.by_class(SC_CLASS):
        tags = pacs.tags(sc)
        assert tags["StudyInstanceUID"] in {pydicom.dcmread(f).StudyInstanceUID for f in files}
        assert tags["BurnedInAnnotation"] == "YES"
    assert {i: pacs.file(i) for i in ids} == originals  # the PACS's own objects untouched
    got = rows(tmp_path / "node")
    assert len(got) == 2 and all(r["label"] and r["dicom_sr"] for r in got)
    assert PHI_NAME.split("^")[0] not in node.log and PHI_ID not in node.log
    assert PHI_ID not in (tmp_path / "node" / "results.csv").read_text()


def test_a_non_allowed_ae_title_is_refused(orthanc, tiny_exported, tmp_path):  # noqa: F811
    pacs = orthanc
    ids = [pacs.upload(xray(tmp_path / "dx.dcm", 0))]
    node = Node(tiny_exported, tmp_path / "node", pacs.node_port, "--allow", "SOMEONE_ELSE")
    try:
        with pytest.raises(urllib.error.HTTPError):  # Orthanc: the C-STORE failed (HTTP 500)
            pacs.send_to_node(ids)
        assert echo(pacs.node_port, "INTRUDER") is None
        assert echo(pacs.node_port, "SOMEONE_ELSE") == 0
    finally:
        assert node.stop() == 0
    assert re.search(r"refused association: calling AE 'ORTHANC' from 127\.0\.0\.1", node.log)
    assert "calling AE 'INTRUDER'" in node.log
    assert not list((tmp_path / "node" / "received").iterdir())
    assert rows(tmp_path / "node") == []


def test_orthanc_down_when_results_are_ready_then_up_delivers_once(orthanc, tiny_exported,  # noqa: F811
                                                                   tmp_path):
    pacs = orthanc
    pacs.stop()
    files = [xray(tmp_path / f"x{i}.dcm", i) for i in range(2)]
    node = Node(tiny_exported, tmp_path / "node", free_port(), "--send-to", pacs.send_to)
    try:
        store_until_ok(node.port, files)
        node.wait_for(r"outbox: .*(cannot reach|no association|rejected)")
        assert len(list((tmp_path / "node" / "outbox").rglob("*.sr.dcm"))) == 2
        pacs.start()
        wait_until(lambda: len(pacs.by_class(SR_CLASS)) == 2, what="the SRs after Orthanc is up")
        time.sleep(2)  # a second delivery would show up by now
    finally:
        assert node.stop() == 0
    assert len(pacs.by_class(SR_CLASS)) == 2
    assert len(list((tmp_path / "node" / "dicom").rglob("*.sr.dcm"))) == 2
    assert not list((tmp_path / "node" / "outbox").rglob("*.dcm"))


#: where the node kills itself (PNEUMO_EDGE_NODE_KILL_AT, pneumo_edge/dicomnode/store.py); the
#: commit steps run in the commit thread while the main thread scores the next batch, and
#: "handed:2" is the second scored batch handed to that thread while the first commits
KILL_POINTS = ["accepted:2", "staged:1", "committed:1", "moving:1", "sent:1", "handed:2"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_then_restart_scores_and_delivers_each_instance_once(orthanc, tiny_exported,  # noqa: F811
                                                                     tmp_path, point):
    pacs = orthanc
    files = [xray(tmp_path / f"x{i}.dcm", i) for i in range(8)]  # two batches at least
    out, args = tmp_path / "node", ("--send-to", pacs.send_to, "--batch", "4")
    node = Node(tiny_exported, out, pacs.node_port, *args, env={KILL_AT: point})
    store(node.port, files)
    assert node.proc.wait(90) == -signal.SIGKILL, node.log
    node = Node(tiny_exported, out, pacs.node_port, *args)
    try:
        store_until_ok(node.port, files)  # what got no status is sent again, as a PACS would
        wait_until(lambda: len(rows(out)) == 8 and not list((out / "outbox").rglob("*.dcm"))
                   and not list((out / "received").glob("*.dcm")), what="all scored and sent")
    finally:
        assert node.stop() == 0
    got = rows(out)
    assert sorted(r["sop_uid"] for r in got) == sorted(sop_uid(f) for f in files)
    assert len(pacs.by_class(SR_CLASS)) == 8
    assert sorted(orthanc_srs(pacs)) == sorted(sop_uid(f) for f in files)
    assert len(list((out / "dicom").rglob("*.sr.dcm"))) == 8
    assert not list((out / "staging").iterdir())


# --- the node alone -----------------------------------------------------------------------------

def test_other_sop_classes_refused_unscoreable_ones_get_error_rows(tiny_exported, tmp_path):
    from pynetdicom import AE

    good, empty, frames = (xray(tmp_path / "ok.dcm", 0), no_pixels(tmp_path / "np.dcm"),
                           multi_frame(tmp_path / "mf.dcm"))
    node = Node(tiny_exported, tmp_path / "node", free_port())
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CT_CLASS, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert not assoc.is_established or not assoc.accepted_contexts
        if assoc.is_established:
            assert [cx.result for cx in assoc.rejected_contexts] == [0x03]  # abstract syntax
            assoc.release()
        assert store(node.port, [good, empty, frames]) == [0, 0, 0]
        wait_until(lambda: len(rows(tmp_path / "node")) == 3, what="3 rows")
    finally:
        assert node.stop() == 0
    by_uid = {r["sop_uid"] or Path(r["path"]).stem: r for r in rows(tmp_path / "node")}
    assert by_uid[sop_uid(good)]["label"] and by_uid[sop_uid(good)]["dicom_sr"]
    for bad in (empty, frames):
        r = by_uid[sop_uid(bad)]
        assert not r["label"] and r["error"] and not r["dicom_sr"]


def qc_cases(tmp_path: Path) -> list[Path]:
    """A DX whose window leaves a blank image, a lateral DX (ViewPosition LL), a normal one."""
    stored = np.minimum(picture(0).astype(np.uint16) * 16, 3999)
    stored[0, 0] = 4095  # the window below leaves this pixel white, all the others black
    blank = make(tmp_path / "blank.dcm", stored, WindowCenter=4050.0, WindowWidth=20.0)
    return [blank, make(tmp_path / "lateral.dcm", picture(1).astype(np.uint16) * 16,
                        ViewPosition="LL"), xray(tmp_path / "pa.dcm", 2)]


def by_sop(table: list[dict]) -> dict[str, dict]:
    return {r["sop_uid"]: r for r in table}


def test_the_node_writes_score_s_row_and_qc_verdict_for_each_instance(tiny_exported,
                                                                      tmp_path):
    """Issue 20's qc column in the node (its worker, no network): each instance's row is
    score's on the same file, qc included (blank window, lateral view, a normal PA), and its SR
    records what ``score --dicom-out``'s SR records, the qc verdict included."""
    from pneumo_edge.commands.score import _open
    from pneumo_edge.dicomnode.store import Store
    from pneumo_edge.dicomnode.worker import Worker
    from pneumo_edge.model.qc import BLANK

    files = qc_cases(tmp_path)
    st = Store(tmp_path / "node")
    for f in files:  # as Store.accept leaves them
        (st.received / f"{sop_uid(f)}.dcm").write_bytes(f.read_bytes())
    Worker(st, _open(str(tiny_exported), "onnx", print), send=False, log=print).score(
        st.pending())
    node = by_sop(rows(tmp_path / "node"))
    score = by_sop(score_table(tiny_exported, files, tmp_path, "--runtime", "onnx",
                               "--dicom-out", str(tmp_path / "dcm")))
    blank, lateral, pa = (sop_uid(f) for f in files)
    assert node[blank]["qc"] == BLANK and node[blank]["label"]
    assert node[lateral]["qc"] == "lateral view (ViewPosition LL)"
    assert node[pa]["qc"] == ""
    assert list(node[pa]) == list(score[pa])  # the same header
    for uid in (blank, lateral, pa):
        drop = ("path", "dicom_sr")
        assert {k: v for k, v in node[uid].items() if k not in drop} == \
            {k: v for k, v in score[uid].items() if k not in drop}
        assert read_result(node[uid]["dicom_sr"]) == read_result(score[uid]["dicom_sr"])
    assert f"input quality: {BLANK}" in read_result(node[blank]["dicom_sr"])["parameters"]


def test_listen_qc_refuse_makes_flagged_instances_error_rows_without_sr(tiny_exported,
                                                                        tmp_path):
    files = qc_cases(tmp_path)
    node = Node(tiny_exported, tmp_path / "node", free_port(), "--qc", "refuse")
    try:
        assert store(node.port, files) == [0, 0, 0]
        wait_until(lambda: len(rows(tmp_path / "node")) == 3, what="3 rows")
    finally:
        assert node.stop() == 0
    got = by_sop(rows(tmp_path / "node"))
    score = by_sop(score_table(tiny_exported, files, tmp_path, "--qc", "refuse"))
    blank, lateral, pa = (sop_uid(f) for f in files)
    for uid in (blank, lateral):
        assert got[uid]["error"].startswith("refused by --qc refuse: ") and got[uid]["qc"]
        assert not got[uid]["label"] and not got[uid]["p_PNEUMONIA"]
        assert not got[uid]["dicom_sr"] and not (tmp_path / "node" / "dicom" / uid).exists()
    assert got[pa]["label"] and got[pa]["dicom_sr"] and not got[pa]["qc"]
    for uid in (blank, lateral, pa):
        assert {k: v for k, v in got[uid].items() if k not in ("path", "dicom_sr")} == \
            {k: v for k, v in score[uid].items() if k != "path"}
    assert "qc flagged 2" in node.log


def test_a_results_csv_with_another_header_is_refused_saying_what_to_do(tiny_exported,
                                                                         tmp_path):
    """A results.csv written before the qc column (or by another model) is not appended to;
    the message says how to go on."""
    from pneumo_edge.commands.score import _open
    from pneumo_edge.dicomnode.store import Store
    from pneumo_edge.dicomnode.worker import Worker
    from pneumo_edge.errors import PneumoError

    st = Store(tmp_path / "node")
    old = "path,label,p_NORMAL,p_PNEUMONIA,study_uid,series_uid,sop_uid,dicom_sr,error\n"
    (st.out / "results.csv").write_text(old)
    with pytest.raises(PneumoError, match=r"results\.csv: its header is not this node's .*qc"
                       r".*another --out folder.*move results\.csv aside"):
        Worker(st, _open(str(tiny_exported), "onnx", print), send=False, log=print)
    assert (st.out / "results.csv").read_text() == old


def test_garbage_on_the_socket_does_not_stop_the_node(tiny_exported, tmp_path):
    node = Node(tiny_exported, tmp_path / "node", free_port())
    try:
        junks = (b"\x00" * 10, b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096),
                b"\x01\x00\x00\x00\xff\xff\xff\xff" + os.urandom(64))
        for junk in junks * 3:  # more than the 8 simultaneous associations allowed
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
                s.sendall(junk)
                s.settimeout(2)
                try:
                    s.recv(100)
                except OSError:
                    pass
        # connections that never complete a request hold a place for at most the 5 s
        # associate timeout (scp.Limits); then a valid C-ECHO and C-STORE are served
        wait_until(lambda: echo(node.port) == 0, timeout=20, what="a C-ECHO after the garbage")
        assert store(node.port, [xray(tmp_path / "ok.dcm", 0)]) == [0]
        assert node.proc.poll() is None
    finally:
        assert node.stop() == 0


def test_sigterm_finishes_what_was_accepted(tiny_exported, tmp_path):
    files = [xray(tmp_path / f"x{i}.dcm", i) for i in range(3)]
    node = Node(tiny_exported, tmp_path / "node", free_port(), "--batch", "50",
                "--max-wait", "600")
    assert store(node.port, files) == [0, 0, 0]
    assert node.stop() == 0  # the batch is not full and its wait not over: SIGTERM scores it
    assert len(rows(tmp_path / "node")) == 3
    assert "stopping" in node.log


def helpers(pid: int) -> dict[str, int]:
    """The node's helper processes (``pneumo_edge.dicomnode.<name>``) -> their pids."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and len(cmd) > 2 and cmd[2].startswith(b"pneumo_edge.dicomnode."):
            out[cmd[2].decode().rpartition(".")[2]] = int(stat.parent.name)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_kill_9_of_the_node_takes_its_helper_processes_with_it(tiny_exported, tmp_path):
    """The network and builder processes die with the node: nothing keeps the port or builds
    objects for a node that is gone, and a restart can listen at once."""
    port = free_port()
    node = Node(tiny_exported, tmp_path / "node", port)
    kids = helpers(node.proc.pid)
    assert sorted(kids) == ["builder", "network"]
    node.proc.kill()
    node.proc.wait(30)
    wait_until(lambda: not any(alive(p) for p in kids.values()), timeout=10,
               what="the helper processes to die with the node")
    node = Node(tiny_exported, tmp_path / "node", port)  # listens on the same port again
    try:
        assert echo(port) == 0
    finally:
        assert node.stop() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_dead_network_process_stops_the_node_after_scoring_what_it_accepted(tiny_exported,
                                                                            tmp_path):
    files = [xray(tmp_path / f"x{i}.dcm", i) for i in range(3)]
    node = Node(tiny_exported, tmp_path / "node", free_port(), "--batch", "50",
                "--max-wait", "600")
    assert store(node.port, files) == [0, 0, 0]
    os.kill(helpers(node.proc.pid)["network"], signal.SIGKILL)
    assert node.proc.wait(60) == 1
    node.stop()
    assert "error: the DICOM network process exited" in node.log
    assert sorted(r["sop_uid"] for r in rows(tmp_path / "node")) == sorted(map(sop_uid, files))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_dead_builder_process_stops_the_node_and_a_restart_scores_each_instance_once(
        tiny_exported, tmp_path):
    files = [xray(tmp_path / f"x{i}.dcm", i) for i in range(3)]
    out = tmp_path / "node"
    node = Node(tiny_exported, out, free_port(), "--batch", "50", "--max-wait", "600")
    os.kill(helpers(node.proc.pid)["builder"], signal.SIGKILL)
    assert store(node.port, files) == [0, 0, 0]
    node.proc.send_signal(signal.SIGTERM)  # score the batch now: its objects cannot be built
    assert node.proc.wait(60) == 1
    node.stop()
    assert "error: the process that builds the result objects stopped" in node.log
    assert len(rows(out)) == 0 and len(list((out / "received").glob("*.dcm"))) == 3
    node = Node(tiny_exported, out, node.port, "--batch", "3")
    try:
        wait_until(lambda: len(rows(out)) == 3, what="the accepted instances scored")
    finally:
        assert node.stop() == 0
    assert sorted(r["sop_uid"] for r in rows(out)) == sorted(map(sop_uid, files))
    assert all(r["dicom_sr"] for r in rows(out))
    assert len(list((out / "dicom").rglob("*.sr.dcm"))) == 3


def test_the_builder_process_builds_what_the_commit_thread_would(tiny_exported, tmp_path):
    """More jobs than its window, in order, an SR each as build_objects makes it here; a job
    whose source cannot get objects gets its reason, not a crash."""
    from pneumo_edge.dicomnode.builder import WINDOW, BuilderProcess
    from pneumo_edge.dicomnode.worker import build_objects
    from pneumo_edge.outputs.dicom_objects import ResultInfo

    n = WINDOW + 5
    srcs = [xray(tmp_path / f"x{i}.dcm", i) for i in range(n)]
    srcs[3].write_bytes(b"not a DICOM file")
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    info = [ResultInfo(probability=i / n, label="PNEUMONIA" if i / n >= 0.5 else "NORMAL",
                       positive_class="PNEUMONIA", threshold=0.5, threshold_source="card",
                       model_sha256="ab" * 32, model_file="model.onnx", runtime="onnx",
                       precision="fp32", version="test") for i in range(n)]
    builder = BuilderProcess()
    try:
        got = builder.build([(s, i, there, None) for s, i in zip(srcs, info)])
    finally:
        builder.close()
    want = [build_objects((s, i, here, None)) for s, i in zip(srcs, info)]
    assert [g[0] for g in got] == [w[0] for w in want] == [s.stem for s in srcs]
    assert [bool(g[2]) for g in got] == [bool(w[2]) for w in want] == [i == 3 for i in range(n)]
    assert got[3][2] == want[3][2]
    for (_, sr, _), (_, sr_here, _) in zip(got, want):
        if sr is not None:
            assert sr.parent.parent == there
            assert read_result(sr) == read_result(sr_here)


def test_a_port_in_use_is_a_one_line_error_and_no_process_is_left(tiny_exported, tmp_path):
    """The network process cannot listen: the node says why in one line, exit 2, and its
    helpers end with it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "pneumo_edge", "listen", "--model",
                                 str(tiny_exported), "--out", str(tmp_path / "n"), "--port",
                                 str(port)], cwd=REPO, stderr=subprocess.PIPE, text=True)
        seen = []
        if sys.platform.startswith("linux"):
            wait_until(lambda: seen.extend(helpers(proc.pid).values()) or len(set(seen)) == 2
                       or proc.poll() is not None, timeout=60, what="the helper processes")
        err = proc.communicate(timeout=90)[1]
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on 127.0.0.1:{port}: "), err
    assert not any(alive(p) for p in seen)


def test_a_library_printing_in_the_builder_process_breaks_nothing_and_prints_nothing(
        tiny_exported, tmp_path):
    """Only the protocol's lines reach the pipe: a print in the builder process (here around
    each build, as a library might print) goes nowhere, so it neither breaks the answers nor
    puts a value in the log."""
    from pneumo_edge.dicomnode.builder import BuilderProcess
    from pneumo_edge.outputs.dicom_objects import ResultInfo

    noisy = ("import sys, pneumo_edge.dicomnode.worker as w\n"
             "real = w.build_objects\n"
             "def build(job):\n"
             "    print('PatientName', flush=True)\n"
             "    return real(job)\n"
             "w.build_objects = build\n"
             "from pneumo_edge.dicomnode import builder\n"
             "sys.exit(builder.serve())\n")
    builder = BuilderProcess()
    builder.close()
    builder.proc = subprocess.Popen([sys.executable, "-c", noisy], cwd=REPO, text=True,
                                    bufsize=1, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
    src = xray(tmp_path / "x.dcm", 0)
    info = ResultInfo(probability=0.75, label="PNEUMONIA", positive_class="PNEUMONIA",
                      threshold=0.5, threshold_source="card", model_sha256="cd" * 32,
                      model_file="model.onnx", runtime="onnx", precision="fp32", version="test")
    try:
        (stem, sr, error), = builder.build([(src, info, tmp_path, None)])
    finally:
        builder.proc.stdin.close()
        err = builder.proc.stderr.read()
        builder.proc.wait()
    assert (stem, error) == ("x", "") and read_result(sr)["probability"] == 0.75
    assert "PatientName" not in err


def test_listen_refuses_a_public_address_without_allow(tiny_exported, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pneumo_edge", "listen", "--model",
                        str(tiny_exported), "--out", str(tmp_path / "n"), "--host", "0.0.0.0"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("error: --host 0.0.0.0") and "--allow" in r.stderr


def test_an_instance_over_the_size_limit_is_refused_and_not_stored(tmp_path):
    """The receiving side alone (no model): a real pynetdicom server with a small limit."""
    from pneumo_edge.dicomnode.scp import OUT_OF_RESOURCES, Handlers, Limits, make_ae
    from pneumo_edge.dicomnode.store import Store

    store_ = Store(tmp_path / "node")
    limits = Limits(max_instance_bytes=5000)
    ae, port = make_ae(NODE_AET, limits), free_port()
    seen = []
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=Handlers(store_, (), limits, lambda: None,
                                                   seen.append).bindings())
    try:
        big, small = xray(tmp_path / "big.dcm", 0), tmp_path / "small.dcm"
        make(small, np.zeros((8, 8), np.uint16))
        assert store(port, [big, small]) == [OUT_OF_RESOURCES, 0]
    finally:
        server.shutdown()
    assert [p.name for p in (tmp_path / "node" / "received").iterdir()] == [f"{sop_uid(small)}.dcm"]
    assert any("over the 5000 byte limit" in line for line in seen)


def test_the_node_scores_and_builds_objects_without_torch(tiny_exported, tmp_path):
    """The node's whole path (store, worker with --explain, SR and SC) in a fresh interpreter:
    torch is never imported (an edge box has onnxruntime only)."""
    src = xray(tmp_path / "x.dcm", 0)
    code = f"""
import sys, shutil
from pneumo_edge.commands.score import _open
from pneumo_edge.dicomnode.store import Store
from pneumo_edge.dicomnode.worker import Worker
st = Store({str(tmp_path / 'node')!r})
shutil.copy({str(src)!r}, st.received / {sop_uid(src) + '.dcm'!r})
w = Worker(st, _open({str(tiny_exported)!r}, "onnx", print), send=True, explain=True, log=print)
rows = w.score(st.pending())
print("label:", rows[0][1], "objects:", len(list((st.out / "outbox").rglob("*.dcm"))))
print("torch:", "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "objects: 2" in out and "torch: False" in out, out


def test_the_commit_thread_commits_in_order_while_the_next_batch_is_scored(tiny_exported,
                                                                          tmp_path):
    """The two stages in one process (no network): batch 2 is scored while batch 1 waits in
    the commit thread; batch 1's instances are left out of the next batch until committed;
    each instance gets one row, in the order scored, and its SR; then an error in the commit
    thread stops the pipeline and is raised in the main thread."""
    from pneumo_edge.commands.score import _open
    from pneumo_edge.dicomnode.committer import Committer
    from pneumo_edge.dicomnode.store import Store
    from pneumo_edge.dicomnode.worker import Worker

    st = Store(tmp_path / "node")
    for i in range(6):
        src = xray(tmp_path / f"x{i}.dcm", i)
        os.replace(src, st.received / f"{sop_uid(src)}.dcm")
    worker = Worker(st, _open(str(tiny_exported), "onnx", print), send=False, log=print)
    gate, committed, stopped = threading.Event(), [], threading.Event()

    class Held:  # batch 1 stays uncommitted until batch 2 is scored
        def commit(self, batch):
            gate.wait(30)
            return worker.commit(batch)

    def done(batch, got, seconds):
        committed.append([Path(r[0]).name for r in got])

    committer = Committer(Held(), done, stopped.set)
    first = st.pending()[:3]
    committer.submit(worker.run(first))
    assert committer.busy() == {f.name for f in first}
    assert set(first) < set(st.pending())  # still in received/, not to be scored again:
    second = st.pending(committer.busy())
    assert len(second) == 3 and not set(second) & set(first)
    committer.submit(worker.run(second))
    gate.set()
    committer.drain()
    assert committed == [[f.name for f in first], [f.name for f in second]]
    assert committer.busy() == set() and not list(st.received.glob("*.dcm"))
    names = [Path(r["path"]).name for r in rows(tmp_path / "node")]
    assert names == [f.name for f in first + second]
    assert len(list((tmp_path / "node" / "dicom").rglob("*.sr.dcm"))) == 6
    worker.results.close()  # the journal can no longer be written: the next commit fails
    src = xray(tmp_path / "late.dcm", 0)
    os.replace(src, st.received / f"{sop_uid(src)}.dcm")
    committer.submit(worker.run(st.pending()))
    assert stopped.wait(30)
    with pytest.raises(ValueError):
        committer.drain()
    committer.close()
    assert len(list(st.received.glob("*.dcm"))) == 1  # not committed: scored again at restart


def test_outbox_sends_files_as_they_are_and_converts_for_an_implicit_only_pacs(tmp_path):
    """Objects go out from the file without decoding (pynetdicom's chunked send) when the PACS
    accepts Explicit VR; a PACS that accepts only Implicit VR still gets them, converted."""
    from pneumo_edge.dicomnode.outbox import Destination, Sender
    from pneumo_edge.outputs.dicom_objects import ResultInfo, write_result_objects

    src = xray(tmp_path / "src.dcm", 0)
    info = ResultInfo(0.25, "NORMAL", "PNEUMONIA", 0.5, "card", "ab" * 32, "m.onnx", "onnx",
                      "fp32", "0.1.0")
    for syntax in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian):
        out = tmp_path / syntax.name.replace(" ", "")
        (out / "outbox").mkdir(parents=True)
        sr = write_result_objects(src, info, out / "outbox")[0]
        got = []

        def on_store(event, got=got):
            got.append((event.context.transfer_syntax, event.dataset.SOPInstanceUID))
            return 0x0000

        ae = pynetdicom.AE("PACS")
        ae.add_supported_context(SR_CLASS, [syntax])
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(pynetdicom.evt.EVT_C_STORE, on_store)])
        try:
            sender = Sender(out, Destination("PACS", "127.0.0.1", port), "PNEUMO")
            assert sender.send_all() and sender.delivered == 1
        finally:
            server.shutdown()
        assert got == [(syntax, pydicom.dcmread(out / "dicom" / sr.relative_to(
            out / "outbox")).SOPInstanceUID)]
        assert not list((out / "outbox").rglob("*.dcm"))
