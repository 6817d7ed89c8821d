"""The options of ``eval``, ``bench``, ``score`` and ``explain`` that have a library default:
each field states its default once, with the help text the CLI shows
(``field(default=..., metadata={"help": ...})``). The CLI reads them (pneumo_edge.cli
``from_field``) when a command runs or shows its help, and the plain functions take their
keyword defaults from the frozen instances at the end (``batch: int = SCORE_DEFAULTS.batch``
in ``run_score``; tests/test_cli.py refuses a restated literal). So this module imports no
command (they import it); the bootstrap's resamples are the statistics module's.

Options that training and export own live with them: ``TrainConfig`` (train/config.py),
``ExportOptions`` (export/options.py), ``Tolerance`` (export/parity.py), ``QuantOptions``
(export/quantize.py), ``BuildOptions`` (export/tensorrt.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pneumo_edge.evaluation.stats import RESAMPLES


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EvalOptions:
    runtime: str = _opt("auto", "auto picks what score would pick.")
    batch: int = _opt(32, "Images per model call.")
    resamples: int = _opt(RESAMPLES, "Bootstrap resamples (of patients when file names carry "
                          "patient ids) for the 95 % confidence intervals.")
    gallery: int = _opt(4, "Most confident false negatives and false positives listed "
                        "(each with an occlusion heatmap in --report: about 226 model calls "
                        "per image).")
    prevalence: float | None = _opt(None, "Positive rate of the population the folder stands "
                                    "for, as score's --prevalence: probabilities and threshold "
                                    "move by Bayes' rule on the odds (labels and ROC AUC stay); "
                                    "calibration figures are of the moved probabilities.")


@dataclass(frozen=True)
class BenchOptions:
    runtime: str = _opt("auto", "auto (the runtime scoring would pick), all (every runtime, "
                        "measured or skipped with the reason), or a comma list of "
                        "torch,onnx,onnx-fp16,trt.")
    batch: str = _opt("1,8,32", "Batch sizes, comma separated.")
    warmup: int = _opt(5, "Untimed calls per row.")
    iters: int = _opt(30, "Timed calls per row.")
    max_time: float | None = _opt(None, "Stop a row's timed calls after this many seconds "
                                  "(at least 5 calls).")
    limit: int | None = _opt(None, "Use only the first N image files of --data.")
    threads: int | None = _opt(None, "Decode threads for --data. Default: what scoring uses.")


@dataclass(frozen=True)
class ScoreOptions:
    runtime: str = _opt("auto", "auto picks TensorRT, onnxruntime CUDA, torch CUDA, "
                        "onnxruntime CPU, torch CPU.")
    batch: int = _opt(32, "Images per model call.")
    threshold: float | None = _opt(None, "Decision threshold on the positive class. "
                                   "Default: the model card's.")
    output: str | None = _opt(None, "Write the CSV here (atomically, via FILE.partial) instead "
                              "of stdout.")
    workers: int | None = _opt(None, "Decode threads. Default: the number of cores, at least 2.")
    explain_which: str = _opt("positives", "Which scored images get a heatmap with --explain.")
    dicom_columns: str = _opt("", "Also write these non-identifying DICOM tags after the UIDs: "
                              "Modality, ViewPosition, BodyPartExamined, "
                              "PhotometricInterpretation, TransferSyntaxUID, SOPClassUID, "
                              "BitsStored, Rows, Columns, Manufacturer, ManufacturerModelName.")
    qc: str = _opt("flag", "Input quality gate: flag (keep the label, reasons in the qc column), "
                   "refuse (flagged images become error rows, exit 1) or off.")
    prevalence: float | None = _opt(None, "Positive rate of the population scored, when it "
                                    "differs from the validation split's: probabilities follow "
                                    "Bayes' rule on the odds, labels stay (calibrated models).")


@dataclass(frozen=True)
class ExplainOptions:
    method: str = _opt("occlusion", "occlusion: through the deployed runtime (torch-free); "
                       "gradcam: the torch model's last convolutional stage.")
    runtime: str = _opt("auto", "For occlusion: which file to explain (auto as score).")
    batch: int = _opt(32, "Occluded copies per model call.")


#: The defaults, for the plain functions' signatures (frozen: shared by every caller).
EVAL_DEFAULTS = EvalOptions()
BENCH_DEFAULTS = BenchOptions()
SCORE_DEFAULTS = ScoreOptions()
EXPLAIN_DEFAULTS = ExplainOptions()
