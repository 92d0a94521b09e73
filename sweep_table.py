"""Mean ± sample std over seeds of evaluate.py's JSON files: a markdown table to read or paste.

    python sweep_table.py runs/crossdomain_guide     # what make crossdomain-guide wrote

Reads FOLDER/<run>_<seed>/<name>.json (e.g. synth_crop_2/on_tecom300.json): one row per run and
JSON name, the seeds pooled; of a trainer's metrics.json, only its holdout's scores (row
"holdout"). A column per score that any of them has (accuracy, balanced accuracy, ECE before and
after the temperature, Dice). Writes FOLDER/table.md too.
"""
import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from data import atomic_write

# (column, path into evaluate.py's JSON, scale, digits)
COLUMNS = (
    ("accuracy %", ("accuracy",), 100, 1),
    ("balanced %", ("balanced_accuracy",), 100, 1),
    ("ECE", ("calibration", "before", "ece"), 1, 3),
    ("ECE, temperature", ("calibration", "after", "ece"), 1, 3),
    ("Dice", ("dice",), 1, 3),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a folder of <run>_<seed>/ folders holding evaluate.py JSONs")
    args = p.parse_args(argv)
    if not Path(args.folder).is_dir():
        p.error(f"{args.folder}: not a folder")
    return args


def lookup(record, path):
    """record[path[0]][path[1]]...; None where a key is missing."""
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def collect(folder):
    """{(run, json name): [evaluate.py JSON of each seed]} of FOLDER/<run>_<seed>/<name>.json."""
    groups = defaultdict(list)
    for path in sorted(Path(folder).glob("*_*/*.json")):
        run, _, seed = path.parent.name.rpartition("_")
        if not seed.isdigit():   # not a run of one seed
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"error: {path}: not readable JSON ({e})")
        name = path.stem
        if path.name == "metrics.json":   # a trainer's: only its holdout's scores (--holdout F)
            record = lookup(record, ("holdout",))
            name = "holdout"
        if record:
            groups[run, name].append(record)
    return groups


def mean_std(values, scale, digits):
    """'mean ± std' of the values times `scale` (std over 2+ values), or '-' without any."""
    if not values:
        return "-"
    scaled = [v * scale for v in values]
    mean = sum(scaled) / len(scaled)
    if len(scaled) < 2:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in scaled) / (len(scaled) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(groups):
    """The markdown table: a row per (run, JSON name), only the columns some row has."""
    rows = []
    used = set()
    for (run, name), records in sorted(groups.items()):
        cells = [run, name, str(len(records))]
        for i, (_, path, scale, digits) in enumerate(COLUMNS):
            values = [lookup(r, path) for r in records]
            values = [v for v in values if v is not None]
            if values:
                used.add(i)
            cells.append(mean_std(values, scale, digits))
        rows.append(cells)
    keep = [0, 1, 2] + [3 + i for i in sorted(used)]
    header = ["run", "scored", "seeds"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(header[k] for k in keep) + " |"]
    lines.append("|" + "---|" * len(keep))
    for cells in rows:
        lines.append("| " + " | ".join(cells[k] for k in keep) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    groups = collect(args.folder)
    if not groups:
        sys.exit(f"error: {args.folder}: no <run>_<seed>/<name>.json files")
    text = table(groups)
    print(text)
    atomic_write(Path(args.folder, "table.md"), lambda f: f.write((text + "\n").encode()))
    return text


if __name__ == "__main__":
    main()
