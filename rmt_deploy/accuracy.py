"""Top-1 of a runner on a labelled image folder, and the low-precision accuracy gate: an artifact
may lose at most ``max_drop`` points of top-1 against float32 eager on the same images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .parity import ParityError, ParityReport, Tolerance, compare
from .preprocess import image_files, load_images
from .runners.base import Runner, infer_padded

DEFAULT_MAX_DROP = 1.0      # points of top-1


def labelled_images(root: str | Path, labels_file: str | Path | None = None) -> tuple[list[Path], np.ndarray]:
    """ImageFolder layout (sorted class sub-folders are classes 0..N-1, as torchvision and the
    ImageNet synset order have it), or a labels file of ``relative/path label`` lines (``#`` comments
    and blank lines skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a directory")
    if labels_file:
        paths, labels = [], []
        for number, line in enumerate(Path(labels_file).read_text().splitlines(), 1):
            fields = line.split("#", 1)[0].replace(",", " ").split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(f"{labels_file}:{number}: expected 'relative/path label', got {line.strip()!r}")
            paths.append(root / fields[0])
            labels.append(int(fields[1]))
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images listed in {labels_file} do not exist, e.g. {missing[0]}")
        return paths, np.asarray(labels)
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; give --labels FILE for a flat folder")
    pairs = [(p, i) for i, d in enumerate(classes) for p in image_files(d)]
    if not pairs:
        raise ValueError(f"no images under {root}")
    return [p for p, _ in pairs], np.asarray([i for _, i in pairs])


def labelled_arrays(root: str | Path, image_size: int, labels_file: str | Path | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The whole labelled folder decoded and preprocessed as the server does: (images, labels)."""
    paths, labels = labelled_images(root, labels_file)
    return load_images(paths, image_size), labels


@dataclass(frozen=True)
class Top1:
    images: int
    top1: float                  # fraction correct
    predictions: np.ndarray

    @property
    def points(self) -> float:
        return 100.0 * self.top1


def logits(runner: Runner, images: np.ndarray, batch: int) -> np.ndarray:
    """Logits of every image, ``batch`` rows per call (the last call zero-padded)."""
    return np.concatenate([infer_padded(runner, images[i:i + batch], batch)["logits"]
                           for i in range(0, len(images), batch)])


def evaluate_top1(runner: Runner, labelled_folder: str | Path | tuple[np.ndarray, np.ndarray], image_size: int,
                  batch: int) -> Top1:
    """Top-1 of a loaded runner on an ImageFolder-style folder (or already preprocessed (images, labels))."""
    images, labels = (labelled_folder if isinstance(labelled_folder, tuple)
                      else labelled_arrays(labelled_folder, image_size))
    preds = np.argmax(logits(runner, images, batch), axis=1)
    return Top1(len(labels), float((preds == labels).mean()), preds)


class AccuracyDropError(ParityError):
    """The low-precision artifact loses more top-1 than allowed on the labelled folder."""


@dataclass
class GateReport:
    precision: str
    parity: ParityReport
    reference_top1: Top1 | None = None
    candidate_top1: Top1 | None = None
    max_drop: float = DEFAULT_MAX_DROP

    @property
    def drop(self) -> float | None:
        if self.reference_top1 is None or self.candidate_top1 is None:
            return None
        return self.reference_top1.points - self.candidate_top1.points

    @property
    def passed(self) -> bool:
        return self.parity.passed and (self.drop is None or self.drop <= self.max_drop)

    def text(self) -> str:
        lines = [self.parity.text()]
        if self.drop is not None:
            verdict = "PASSED" if self.drop <= self.max_drop else "FAILED"
            lines.append(f"accuracy {self.parity.candidate} {verdict}: top-1 {self.candidate_top1.points:.2f} % vs "
                         f"{self.reference_top1.points:.2f} % for {self.parity.reference} on "
                         f"{self.candidate_top1.images} images, drop {self.drop:.2f} points (allowed {self.max_drop:.2f})")
        return "\n".join(lines)

    def summary(self) -> dict:
        out = {"precision": self.precision, "parity": self.parity.summary(), "passed": self.passed}
        if self.drop is not None:
            out["accuracy"] = {"reference_top1": self.reference_top1.top1, "top1": self.candidate_top1.top1,
                               "images": self.candidate_top1.images, "drop_points": self.drop,
                               "max_drop_points": self.max_drop}
        return out

    def raise_for_failure(self) -> None:
        """The parity error first (its kind names the mismatch), then an `AccuracyDropError`."""
        if not self.parity.passed:
            kind, _ = self.parity.problems[0]
            raise kind(self.text(), self.parity)
        if not self.passed:
            raise AccuracyDropError(self.text(), self.parity)


def low_precision_gate(reference: Runner, candidate: Runner, precision: str, parity_images: np.ndarray, batch: int,
                       *, labelled: tuple[np.ndarray, np.ndarray] | None = None, max_drop: float = DEFAULT_MAX_DROP,
                       tolerance: Tolerance | None = None) -> GateReport:
    """Compare a loaded low-precision ``candidate`` with the float32 ``reference`` (eager): logits on
    ``parity_images`` against ``precision``'s default tolerance, and with ``labelled`` (images,
    labels) the top-1 drop in points. No exception: see `GateReport.raise_for_failure`."""
    tolerance = tolerance or Tolerance.for_precision(precision)
    parity = compare({"logits": logits(reference, parity_images, batch)},
                     {"logits": logits(candidate, parity_images, batch)}, tolerance, reference.name, candidate.name)
    report = GateReport(precision, parity, max_drop=max_drop)
    if labelled is not None:
        report.reference_top1 = evaluate_top1(reference, labelled, 0, batch)
        report.candidate_top1 = evaluate_top1(candidate, labelled, 0, batch)
    return report
