#!/usr/bin/env bash
# Edge install check: in a fresh virtual environment, `pip install .[cpu]` (no torch) and score
# the bundled samples with an exported model directory (one with model.onnx), then DICOM files
# made from a sample with pydicom (base install) in three transfer syntaxes.
#
#   tests/edge_install_check.sh MODEL_DIR [VENV_DIR]
#
# MODEL_DIR: e.g. the output of `pneumo-edge export runs/r50`. VENV_DIR defaults to a temporary
# folder that is removed afterwards. Needs python3 with venv and the package index. Prints
# "edge install check: OK" and exits 0 on success; anything else is a failure.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${1:?usage: tests/edge_install_check.sh MODEL_DIR [VENV_DIR]}"
model="$(cd "$model" && pwd)"
python="${PYTHON:-python3}"
[[ -f "$model/model.onnx" ]] || { echo "FAIL: $model has no model.onnx (run pneumo-edge export)"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="${2:-$work/venv}"

echo "== creating $venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
echo "== pip install $repo[cpu]"
# build from a copy, so no build/ or egg-info lands in the checkout being tested
"$python" -c 'import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2], symlinks=True,
    ignore=shutil.ignore_patterns(".venv", "runs", ".git", "*.egg-info", "build", "__pycache__"))' \
  "$repo" "$work/src"
"$venv/bin/python" -m pip install -q "$work/src[cpu]"

echo "== checking that torch is absent"
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "FAIL: torch is importable in the edge environment"; exit 1
fi

echo "== scoring the bundled samples"
cd "$work"  # not the repo: the installed package must be the one that runs
set +e
"$venv/bin/pneumo-edge" score "$repo/samples/chest_xray" --model "$model" -o "$work/out.csv" \
  2> "$work/err.txt"
code=$?
set -e
cat "$work/err.txt"
[[ $code -eq 0 ]] || { echo "FAIL: pneumo-edge score exited $code"; exit 1; }
grep -q "^runtime: onnx" "$work/err.txt" || { echo "FAIL: did not run on onnxruntime"; exit 1; }

"$venv/bin/python" - "$work/out.csv" "$repo/samples/chest_xray" <<'EOF'
import csv, sys
from pathlib import Path
rows = list(csv.reader(open(sys.argv[1], newline="", encoding="utf-8")))
exts = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
files = [p for p in Path(sys.argv[2]).rglob("*") if p.is_file() and p.suffix.lower() in exts]
assert rows[0][:2] == ["path", "label"] and rows[0][-1] == "error", rows[0]
assert len(rows) - 1 == len(files), (len(rows) - 1, len(files))
assert all(r[1] and not r[-1] for r in rows[1:]), "some rows have no label"
print(f"{len(files)} rows, all scored")
EOF
"$venv/bin/python" -c "import sys, pneumo_edge.cli, pneumo_edge.commands.score; assert 'torch' not in sys.modules"

echo "== scoring DICOM (uncompressed, RLE, JPEG 2000 lossless; one without extension)"
mkdir "$work/dicom"
"$venv/bin/python" - "$repo/samples/chest_xray" "$work/dicom" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid
src = sorted(Path(sys.argv[1]).rglob("*.jpeg"))[0]
v = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 16
for name, syntax in (("plain.dcm", None), ("rle.DCM", RLELossless), ("j2k", JPEG2000Lossless)):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName = "DX", "Edge^Check"
    ds.Rows, ds.Columns = v.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = v.tobytes()
    if syntax is not None:
        ds.compress(syntax, v)
    ds.save_as(Path(sys.argv[2]) / name, enforce_file_format=True)
EOF
"$venv/bin/pneumo-edge" score "$work/dicom" --model "$model" -o "$work/dicom.csv" \
  2> "$work/err.txt" || { cat "$work/err.txt"; echo "FAIL: scoring DICOM"; exit 1; }
"$venv/bin/python" - "$work/dicom.csv" <<'EOF'
import csv, sys
text = open(sys.argv[1], newline="", encoding="utf-8").read()
rows = list(csv.DictReader(text.splitlines()))
assert len(rows) == 3 and all(r["label"] and r["sop_uid"] and not r["error"] for r in rows), rows
assert len({r["p_" + r["label"]] for r in rows}) == 1, "same picture, different probabilities"
assert "Edge" not in text, "patient name in the CSV"
print("3 DICOM rows, all scored, with UIDs")
EOF
echo "edge install check: OK"
