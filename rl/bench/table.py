"""Plain-text tables for the bench subcommands."""

from __future__ import annotations


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print `rows` as aligned columns (floats to 3 significant digits)."""

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    if not cells:
        print("  ".join(columns))
        return
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
