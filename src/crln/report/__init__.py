"""Run reports: training curves, evaluation tables, slice overlays, 3D renders and CRLN's
rectification in one self-contained ``report.html`` (see :func:`build_report`)."""

from __future__ import annotations

from crln.report.build import ReportResult, build_report

__all__ = ["ReportResult", "build_report"]
