"""Plain-text tables for the terminal."""

from __future__ import annotations

from ..doctor import Diagnosis

__all__ = ["format_diagnosis_table"]


def format_diagnosis_table(diag: Diagnosis, class_names: list[str]) -> str:
    """One row per class: images used, then relevant/total channels for each layer."""
    layers = list(diag.layers.values())
    head = ["class", "images"] + [f"{ld.name} ({ld.channels} ch)" for ld in layers]
    rows = [head]
    for k in range(diag.num_classes):
        name = class_names[k] if k < len(class_names) else str(k)
        rows.append(
            [name, str(int(diag.counts[k]))] + [str(int(ld.masks[k].sum())) for ld in layers]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
