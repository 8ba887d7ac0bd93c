"""How every bench script ends: its summary as <name>.json and its table as <name>.md in the results directory
(the README includes the .md; bench/update_readme.py), the table printed too."""
import json


def write_results(out, name, summary, table):
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{name}.md").write_text(table)
    print(table)


