"""The HTML report of an output folder: a contact sheet built from its manifest (`flowgen report`)."""

from flowgen.report.build import REPORT_NAME, render_report, write_report

__all__ = ["REPORT_NAME", "render_report", "write_report"]
