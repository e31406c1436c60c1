"""Numerical comparison of runner outputs against a reference; it knows nothing of backends.

Like Optimum's exporter validation, a failure raises an error specific to the kind of mismatch
and the report carries the max difference per output.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .runners.base import INPUT_NAME, Runner


@dataclass(frozen=True)
class Tolerance:
    max_rel: float = 1e-4            # max |diff| / max |ref|
    min_cosine: float | None = None  # None: not checked
    atol: float | None = None        # optional absolute bound on max |diff|
    topk_identical: int = 5          # top-k indices must agree on every sample (0: not checked)
    min_top1_agreement: float | None = None  # share of samples with the reference's top-1 (None: not checked)

    @classmethod
    def for_precision(cls, precision: str, rtol: float | None = None, atol: float | None = None) -> "Tolerance":
        """Defaults: fp32 max_rel <= 1e-4 with identical top-5; fp16 and bf16 cosine >= 0.999 (fp16 also
        max_rel <= 2e-2, bf16 5e-2: 8 significant bits); int8 cosine >= 0.99 and top-1 agreement >= 97 %
        (its max_rel is not a useful bound: one saturated activation moves a logit a lot)."""
        base = {"fp32": cls(), "fp16": cls(max_rel=2e-2, min_cosine=0.999, topk_identical=0),
                "bf16": cls(max_rel=5e-2, min_cosine=0.999, topk_identical=0),
                "int8": cls(max_rel=float("inf"), min_cosine=0.99, topk_identical=0, min_top1_agreement=0.97)}[precision]
        changes = {k: v for k, v in {"max_rel": rtol, "atol": atol}.items() if v is not None}
        return cls(**{**asdict(base), **changes})


class ParityError(AssertionError):
    """An artifact's outputs do not match the reference."""

    def __init__(self, message: str, report: "ParityReport"):
        super().__init__(message)
        self.report = report


class OutputNamesMismatchError(ParityError): ...
class ShapeMismatchError(ParityError): ...
class NonFiniteOutputError(ParityError): ...
class ValueMismatchError(ParityError): ...
class CosineMismatchError(ParityError): ...
class TopKMismatchError(ParityError): ...
class AgreementError(ParityError): ...


@dataclass
class OutputParity:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class ParityReport:
    reference: str
    candidate: str
    tolerance: Tolerance
    outputs: list[OutputParity]
    problems: list[tuple[type, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        """The manifest's parity block: worst figures over all outputs."""
        tops = [o for o in self.outputs if o.top1_agreement is not None]
        return {
            "reference": self.reference,
            "max_abs": max((o.max_abs for o in self.outputs), default=float("nan")),
            "max_rel": max((o.max_rel for o in self.outputs), default=float("nan")),
            "cosine": min((o.cosine for o in self.outputs), default=float("nan")),
            "top1_agreement": min((o.top1_agreement for o in tops), default=None),
            "top5_agreement": min((o.top5_agreement for o in tops), default=None),
            "passed": self.passed,
        }

    def text(self) -> str:
        lines = [f"parity {self.candidate} vs {self.reference}: {'PASSED' if self.passed else 'FAILED'}"]
        for o in self.outputs:
            top = f" top1 {o.top1_agreement:.3f} top5 {o.top5_agreement:.3f}" if o.top1_agreement is not None else ""
            lines.append(f"  {o.name:<8} {str(o.shape):<20} max_abs {o.max_abs:.3e} max_rel {o.max_rel:.3e} "
                         f"cosine {o.cosine:.6f}{top}" + ("  <- " + "; ".join(o.failures) if o.failures else ""))
        lines += [f"  problem: {msg}" for _, msg in self.problems]
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        if self.problems:
            kind, _ = self.problems[0]
            raise kind(self.text(), self)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], tolerance: Tolerance,
            reference_name: str = "reference", candidate_name: str = "candidate") -> ParityReport:
    report = ParityReport(reference_name, candidate_name, tolerance, [])
    if set(reference) != set(candidate):
        report.problems.append((OutputNamesMismatchError,
                                f"output names differ: reference {sorted(reference)} vs candidate {sorted(candidate)}"))
        return report
    for name, ref in reference.items():
        got = candidate[name]
        ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        if ref64.shape != got64.shape:
            report.problems.append((ShapeMismatchError, f"{name}: shape {got64.shape} vs reference {ref64.shape}"))
            continue
        diff = np.abs(got64 - ref64)
        out = OutputParity(name, ref64.shape, float(diff.max(initial=0.0)),
                           float(diff.max(initial=0.0) / max(np.abs(ref64).max(initial=0.0), 1e-12)),
                           _cosine(got64, ref64))
        if not np.isfinite(got64).all():
            out.failures.append("non-finite values")
            report.problems.append((NonFiniteOutputError, f"{name}: non-finite values in the output"))
        if name == "logits" and ref64.ndim == 2:
            k = min(5, ref64.shape[-1])
            ref_top, got_top = _topk(ref64, k), _topk(got64, k)
            out.top1_agreement = float((ref_top[:, 0] == got_top[:, 0]).mean())
            out.top5_agreement = float((ref_top == got_top).all(axis=1).mean())
            if tolerance.min_top1_agreement is not None and out.top1_agreement < tolerance.min_top1_agreement:
                out.failures.append(f"top-1 agreement {out.top1_agreement:.3f} < {tolerance.min_top1_agreement}")
                report.problems.append((AgreementError, f"{name}: top-1 agrees with the reference on "
                                        f"{out.top1_agreement:.1%} of samples, below {tolerance.min_top1_agreement:.0%}"))
            kk = min(tolerance.topk_identical, k)
            if kk and not (ref_top[:, :kk] == got_top[:, :kk]).all():
                out.failures.append(f"top-{kk} differs")
                report.problems.append((TopKMismatchError, f"{name}: top-{kk} predictions differ on "
                                        f"{int((ref_top[:, :kk] != got_top[:, :kk]).any(axis=1).sum())} samples"))
        if out.max_rel > tolerance.max_rel:
            out.failures.append(f"max_rel {out.max_rel:.2e} > {tolerance.max_rel:.0e}")
            report.problems.append((ValueMismatchError, f"{name}: max_rel {out.max_rel:.3e} above {tolerance.max_rel:.0e}"))
        if tolerance.atol is not None and out.max_abs > tolerance.atol:
            out.failures.append(f"max_abs {out.max_abs:.2e} > {tolerance.atol:.0e}")
            report.problems.append((ValueMismatchError, f"{name}: max_abs {out.max_abs:.3e} above {tolerance.atol:.0e}"))
        if tolerance.min_cosine is not None and out.cosine < tolerance.min_cosine:
            out.failures.append(f"cosine {out.cosine:.6f} < {tolerance.min_cosine}")
            report.problems.append((CosineMismatchError, f"{name}: cosine {out.cosine:.6f} below {tolerance.min_cosine}"))
        report.outputs.append(out)
    return report


def run_batches(runner: Runner, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``runner`` over several input batches, concatenated along the batch axis; an output
    whose other dimensions differ between batches (feature maps of inputs of different sizes) is
    flattened per batch and joined, so the statistics still cover every value."""
    results = [runner.infer({INPUT_NAME: b}) for b in batches]
    joined = {}
    for name in results[0]:
        parts = [r[name] for r in results]
        same_shape = all(p.shape[1:] == parts[0].shape[1:] for p in parts)
        joined[name] = np.concatenate(parts if same_shape else [p.ravel() for p in parts])
    return joined


def check_parity(reference: Runner, candidate: Runner, batches: list[np.ndarray], tolerance: Tolerance) -> ParityReport:
    """Run both runners on the same batches and compare (no exception; see `raise_for_failure`)."""
    return compare(run_batches(reference, batches), run_batches(candidate, batches), tolerance,
                   reference.name, candidate.name)


def parity_inputs(batch: int, height: int, width: int, seed: int = 0, count: int = 2,
                  images: np.ndarray | None = None) -> list[np.ndarray]:
    """Seeded normal-distributed batches (the preprocessed-image statistics) plus real images."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((batch, 3, height, width), dtype=np.float32) for _ in range(count)]
    if images is not None and len(images):
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            if len(chunk) < batch:   # static-batch artifacts need full batches: pad by repeating
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
            batches.append(chunk.astype(np.float32))
    return batches
