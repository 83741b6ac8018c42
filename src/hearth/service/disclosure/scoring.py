"""Severity from a CVSS v3.1 or v4.0 vector, scored by RedHat's ``cvss`` library.

Only these two versions are accepted (v2 and v3.0 are superseded). The vector must carry
its version prefix (``CVSS:3.1/`` or ``CVSS:4.0/``); anything the library refuses is
refused here with reason ``invalid_cvss_vector`` and the library's explanation.

Example::

    s = score_vector("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H")
    assert (s.version, s.base_score, s.severity) == ("3.1", 9.8, "critical")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cvss  # type: ignore[import-untyped]

from hearth.errors import ValidationError

__all__ = ["INVALID_CVSS", "CvssScore", "score_vector"]

INVALID_CVSS = "invalid_cvss_vector"
_MAX_VECTOR = 300
Severity = Literal["none", "low", "medium", "high", "critical"]


@dataclass(frozen=True)
class CvssScore:
    version: Literal["3.1", "4.0"]
    vector: str
    """The vector in the library's canonical form (metrics in the specification's order)."""
    base_score: float
    severity: Severity

    def csaf_cvss_v3(self) -> dict[str, Any]:
        """The ``cvss_v3`` object of a CSAF score (FIRST cvss-v3.1 JSON); v3.1 only."""
        if self.version != "3.1":
            raise ValueError("CSAF 2.0 has no CVSS v4 score object")
        return {
            "version": "3.1",
            "vectorString": self.vector,
            "baseScore": self.base_score,
            "baseSeverity": self.severity.upper(),
        }


def score_vector(vector: str) -> CvssScore:
    """Score ``vector``; raises :class:`ValidationError` (``invalid_cvss_vector``)."""
    if not isinstance(vector, str) or not vector or len(vector) > _MAX_VECTOR:
        raise ValidationError(INVALID_CVSS, "a CVSS vector is a short string")
    v = vector.strip()
    try:
        if v.startswith("CVSS:3.1/"):
            c3 = cvss.CVSS3(v)
            score = float(c3.base_score)
            return CvssScore("3.1", str(c3.clean_vector()), score, _severity(score))
        if v.startswith("CVSS:4.0/"):
            c4 = cvss.CVSS4(v)
            score = float(c4.base_score)
            return CvssScore("4.0", str(c4.clean_vector()), score, _severity(score))
    except cvss.CVSSError as e:
        raise ValidationError(INVALID_CVSS, f"not a valid CVSS vector: {e}") from e
    raise ValidationError(
        INVALID_CVSS, "the vector must start with CVSS:3.1/ or CVSS:4.0/ (other versions refused)"
    )


def _severity(score: float) -> Severity:
    """Qualitative rating; the scales of v3.1 and v4.0 are the same."""
    if score == 0.0:
        return "none"
    if score < 4.0:
        return "low"
    if score < 7.0:
        return "medium"
    if score < 9.0:
        return "high"
    return "critical"
