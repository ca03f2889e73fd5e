"""Check a `facedist predict` output against the Recognizer on the same rows.

Rows in = rows out (every row of the coefficients table once in the predictions), and the
accuracy of the predictions (identity, gender, expression against the table's labels; the group
identity per --group-by value) equals that of Recognizer.predict run here, row by row, on the
same rows: the call /v1/predict answers with (tests/test_serve.py checks /v1/predict against it).

    python scripts/predict_check.py --table TABLE --predictions OUT --models MODELS [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from facedist import storage  # noqa: E402
from facedist.prediction.rows import needed_columns, table_layout, table_parts  # noqa: E402
from facedist.recognition import Recognizer  # noqa: E402
from facedist.schema import LABEL_COLUMNS  # noqa: E402


def accuracy(pairs: list[tuple]) -> float | None:
    pairs = [(p, t) for p, t in pairs if t is not None]
    return round(sum(p == t for p, t in pairs) / len(pairs), 4) if pairs else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help="the coefficients table predicted from")
    parser.add_argument("--predictions", required=True, help="facedist predict's --out")
    parser.add_argument("--models", required=True)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()

    recognizer = Recognizer.from_directory(args.models)
    parts = table_parts(args.table)
    available, _ = table_layout(parts)
    columns = needed_columns(recognizer, available) + [c for c in LABEL_COLUMNS if c in available]
    table = [r for part in parts for r in storage.read_table(part, columns=columns).to_pylist()]
    predicted = storage.read_table(args.predictions).to_pylist()
    by_path = {r["path"]: r for r in predicted}
    here = {row["path"]: recognizer.predict([row]) for row in table}
    pairs: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in table:
        got, answer = by_path.get(row["path"], {}), here[row["path"]]
        image = answer["images"][0]
        mine = {"identity": (answer["identity"] or {}).get("top_k", [{}])[0].get("label") if image["ok"] else None,
                "gender": (answer["gender"] or {}).get("label") if image["ok"] else None,
                "expression": image.get("expression_label")}
        for task, truth in (("identity", row.get("subject")), ("gender", row.get("gender")),
                            ("expression", row.get("expression"))):
            pairs["predict"][task].append((got.get(task), truth))
            pairs["recognizer"][task].append((mine[task], truth))
    groups: dict = defaultdict(list)
    for row in table:
        groups[row.get("subject")].append(row)
    group_pairs = {"predict": [], "recognizer": []}
    for subject, rows in groups.items():
        ranked = (recognizer.predict(rows).get("identity") or {}).get("top_k") or [{}]
        group_pairs["recognizer"].append((ranked[0].get("label"), subject))
        labels = {by_path.get(r["path"], {}).get("group_identity") for r in rows}
        group_pairs["predict"].append((labels.pop() if len(labels) == 1 else None, subject))
    result = {
        "table": args.table, "predictions": args.predictions, "models": args.models,
        "rows_in": len(table), "rows_out": len(predicted), "distinct_paths_out": len(by_path),
        "missing": len(set(r["path"] for r in table) - set(by_path)),
        "accuracy": {source: {task: accuracy(p) for task, p in tasks.items()} for source, tasks in pairs.items()},
        "group_identity_accuracy": {source: accuracy(p) for source, p in group_pairs.items()},
        "same_answers": {task: sum(a[0] == b[0] for a, b in zip(pairs["predict"][task], pairs["recognizer"][task]))
                         for task in ("identity", "gender", "expression")},
    }
    result["equal"] = (result["rows_in"] == result["rows_out"] == result["distinct_paths_out"]
                       and result["accuracy"]["predict"] == result["accuracy"]["recognizer"]
                       and (not any(by_path[p].get("group") for p in by_path)
                            or result["group_identity_accuracy"]["predict"]
                            == result["group_identity_accuracy"]["recognizer"]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
