"""README.md and docs/ against the results files they quote (bench/update_readme.py)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPDATE = ROOT / "bench" / "update_readme.py"


def check(root=ROOT):
    return subprocess.run([sys.executable, str(UPDATE), "--check", "--root", str(root)], capture_output=True, text=True)


def copy_documents(root):
    """The documents and every file they quote, under root."""
    for part in ("README.md", "docs", "config", "bench/results"):
        source = ROOT / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / part)


def test_every_document_agrees_with_its_results_files():
    result = check()
    assert result.returncode == 0, result.stderr
    assert len((ROOT / "README.md").read_text()) <= 12_000


def test_a_stale_figure_is_named_and_the_update_rewrites_it(tmp_path):
    copy_documents(tmp_path)
    load = tmp_path / "bench" / "results" / "load.json"
    summary = json.loads(load.read_text())
    summary["shutdown"]["sigint_s"] = 123.456
    load.write_text(json.dumps(summary))
    (tmp_path / "config" / "drive.yaml").write_text((tmp_path / "config" / "drive.yaml").read_text().replace(
        "max_new_tokens: 48", "max_new_tokens: 64"))
    stale = check(tmp_path)
    assert stale.returncode == 1
    assert "bench/results/headline.md" in stale.stderr  # the README's results, made from load.json
    assert "docs/ros2.md: parameters config/drive.yaml" in stale.stderr
    subprocess.run([sys.executable, str(UPDATE), "--root", str(tmp_path)], check=True, capture_output=True)
    assert "123.46 s after SIGINT" in (tmp_path / "README.md").read_text()
    assert "| `max_new_tokens` | `64` |" in (tmp_path / "docs" / "ros2.md").read_text()
    assert check(tmp_path).returncode == 0


def test_a_mark_without_its_value_is_an_error_naming_it(tmp_path):
    copy_documents(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "\n<!-- value bench/results/load.json load/no_such_key -->1<!-- end -->\n")
    result = check(tmp_path)
    assert result.returncode == 1 and "bench/results/load.json has no value at load/no_such_key" in result.stderr


def test_an_include_is_copied_and_a_missing_file_refused_with_nothing_written(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.md").write_text("| new | table |\n")
    (tmp_path / "docs").mkdir()
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "page.md"
    readme.write_text("# x\n<!-- include results/a.md -->\nold\n<!-- end include -->\ntail\n")
    page.write_text("<!-- include results/a.md -->\n<!-- end include -->\n")
    subprocess.run([sys.executable, str(UPDATE), "--root", str(tmp_path)], check=True, capture_output=True)
    assert readme.read_text() == "# x\n<!-- include results/a.md -->\n| new | table |\n<!-- end include -->\ntail\n"
    (tmp_path / "results" / "a.md").write_text("| newer |\n")
    page.write_text("<!-- include results/b.md -->\nkept\n<!-- end include -->\n")
    failed = subprocess.run([sys.executable, str(UPDATE), "--root", str(tmp_path)], capture_output=True, text=True)
    assert failed.returncode != 0 and "docs/page.md: results/b.md not found" in failed.stderr
    assert "kept" in page.read_text() and "| new | table |" in readme.read_text()  # nothing written


def test_the_pinned_versions_the_docs_give_are_those_setup_installs():
    import re

    pinned = dict(re.findall(r"^([\w.-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M))
    pinned.update(re.findall(r"--no-deps ([\w.-]+)==(\S+)", (ROOT / "scripts" / "setup.sh").read_text()))
    given = [(package, version) for document in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
             for package, version in re.findall(r"\b([a-z][\w.-]*)==([\w.+]+)", document.read_text())]
    assert given and all(pinned.get(package) == version for package, version in given), [
        (package, version, pinned.get(package)) for package, version in given if pinned.get(package) != version]


def test_the_pick_at_a_target_keeps_the_most_of_dense_generated_answers_and_shows_its_options():
    sys.path.insert(0, str(ROOT / "bench"))
    from update_readme import picks

    def row(name, target, exact_match, cider, args=()):
        metrics = {"closed_mean_acc": (0.6, 0.5, 0.7), "gen_action_exact_match": (exact_match, 0, 1),
                   "gen_cider": (cider, 0, 10)}
        return {"name": name, "target": target, "metrics": metrics, "size_mb": 1.0,
                "args": ["owled", "prune", "--method", name.rsplit("-", 1)[0], "--sparsity", target, *args]}

    dense = row("dense-0", "0", 0.6, 6.0)
    runs = [row("cider-0.5", "0.5", 0.3, 5.9),  # the highest CIDEr, half of dense's exact match
            row("wording-0.5", "0.5", 0.57, 5.7, ["--questions", "6"])]  # a little less CIDEr, the wording kept
    sweep = {"model": "m", "eval_frame_sets": 2, "generated_frame_sets": 2, "results": [dense, dense, *runs],
             "comparisons": [], "comparison_confidence": 0.95}
    line = next(line for line in picks(sweep) if line.startswith("| 50 %"))
    assert "`--method wording --questions 6`" in line and "0.570" in line
    # the heading says whether the sweep's model is the shipped default
    from owled_ros.model.build import DEFAULT_MODEL_ID, DEFAULT_SHA256
    assert "on an earlier default driving model** (`m`" in picks(sweep)[0]
    shipped = sweep | {"model": f"/cache/{DEFAULT_MODEL_ID}-{DEFAULT_SHA256[:12]}"}
    assert "on the default driving model**" in picks(shipped)[0]

    # A dense model that never matches the action's wording: the pick is the run that keeps the most CIDEr.
    dense["metrics"]["gen_action_exact_match"] = (0.0, 0.0, 0.0)
    line = next(line for line in picks(sweep) if line.startswith("| 50 %"))
    assert "`--method cider`" in line
