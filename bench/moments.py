"""Placeholder: filled by issue 16, item 4."""
TITLE = "Data moments hoisted"


def section(args, rows_out, note, table, skipped):
    return "(not yet)"
