"""Reports from run directories: a comparison table, PNG plots and a self-contained report.html."""

from fedzip.report.report import load_run, print_table, write_report

__all__ = ["load_run", "print_table", "write_report"]
