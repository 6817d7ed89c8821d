"""Orthanc (https://www.orthanc-server.com, Debian package ``orthanc``) as the stand-in PACS the
node is tested and measured against: :meth:`Orthanc.config` is an Orthanc configuration that
knows a pneumo-edge node as the modality ``pneumo`` (the example docs/hospital.md shows), and
:class:`Orthanc` starts one on given localhost ports with its own storage folder and talks to it
over REST (upload, ask it to C-STORE to the node, list what it holds). Used by tests/pacs.py
and benchmarks/node_throughput.py; not by the node itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ORTHANC_AET = "ORTHANC"
NODE_AET = "PNEUMO_EDGE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    http: int
    dicom: int
    node_port: int  # where the config says the pneumo-edge node listens
    folder: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def send_to(self) -> str:
        return f"{ORTHANC_AET}@127.0.0.1:{self.dicom}"

    def config(self) -> dict:
        return {
            "Name": "pneumo-edge-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"), "HttpPort": self.http,
            "DicomPort": self.dicom, "DicomAet": ORTHANC_AET, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpServerEnabled": True, "Plugins": [],
            "DicomModalities": {"pneumo": [NODE_AET, "127.0.0.1", self.node_port]},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "StableAge": 1, "ConcurrentJobs": 2, "OverwriteInstances": False,
        }

    def start(self) -> None:
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config()))
        # TCP_NODELAY=1: DCMTK (Orthanc's DICOM side) then turns Nagle's algorithm off; with it
        # on, every C-STORE the node sends waits ~40 ms for a delayed ACK (docs/hospital.md)
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.folder / "orthanc.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.proc.returncode}: "
                                   f"{(self.folder / 'orthanc.log').read_text()[-800:]}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # --- REST ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 60):
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def get(self, path: str):
        return self.request("GET", path, timeout=5)

    def upload(self, path: Path) -> str:
        """Store a DICOM file; returns Orthanc's instance id."""
        return self.request("POST", "/instances", Path(path).read_bytes())["ID"]

    def send_to_node(self, instance_ids: list[str]) -> dict:
        """``POST /modalities/pneumo/store`` (synchronous C-STORE from Orthanc to the node)."""
        body = json.dumps({"Resources": instance_ids, "Synchronous": True}).encode()
        return self.request("POST", "/modalities/pneumo/store", body)

    def instances(self) -> list[str]:
        return self.get("/instances")

    def tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def by_class(self, sop_class: str) -> list[str]:
        return [i for i in self.instances() if self.tags(i).get("SOPClassUID") == sop_class]
