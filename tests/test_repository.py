"""Repository hygiene: the conda environment matches the pinned pip install, the code is ruff-clean,
and every top-level script follows the `parse_args(argv)` / `main(argv=None)` convention."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

# The entry-point scripts a researcher runs; library modules (modeling_*, helpers) are not listed.
SCRIPTS_WITH_MAIN = [
    REPO_ROOT / name
    for name in (
        "run_study.py",
        "wikitext_trainer.py",
        "run_glue.py",
        "gather_glue_results.py",
        "convert_bert_checkpoint.py",
        "demo_data/make_demo_data.py",
    )
]
# Benchmarks: the same functions, but they put the repository on sys.path at import (run from bench/).
BENCH_SCRIPTS = sorted((REPO_ROOT / "bench").glob("*.py"))


def read_requirements(path: Path) -> tuple[dict[str, str], list[str]]:
    pins, includes = {}, []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            includes.append(line[3:].strip())
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        assert match, f"{path.name}: '{line}' is not pinned with =="
        pins[match.group(1).lower()] = match.group(2)
    return pins, includes


def test_requirements_are_pinned_and_torch_is_the_local_cpu_build():
    pins, _ = read_requirements(REPO_ROOT / "requirements.txt")
    assert pins["torch"] == "2.13.0"
    assert pins["transformers"].startswith("5.")
    for needed in ("tokenizers", "datasets", "accelerate", "safetensors", "scikit-learn", "scipy", "pandas",
                   "matplotlib", "nbclient", "tensorboard", "tqdm"):  # fmt: skip
        assert needed in pins, f"requirements.txt lacks {needed}"
    dev_pins, dev_includes = read_requirements(REPO_ROOT / "requirements-dev.txt")
    assert dev_includes == ["requirements.txt"] and {"pytest", "ruff"} <= set(dev_pins)


def test_conda_environment_matches_requirements():
    env = yaml.safe_load((REPO_ROOT / "electra_moe_env.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip_section == ["-r requirements.txt", "-r requirements-dev.txt"]
    for entry in pip_section:
        assert (REPO_ROOT / entry.split()[1]).is_file()


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    pins, _ = read_requirements(REPO_ROOT / "requirements.txt")
    for name, pinned in pins.items():
        assert version(name).split("+")[0] == pinned, f"{name}: installed {version(name)}, pinned {pinned}"


def check_parser_functions(script: Path) -> ast.Module:
    text = script.read_text()
    tree = ast.parse(text)
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"build_argument_parser", "parse_args", "main"} <= functions, (
        f"{script.name} needs build_argument_parser(), parse_args(argv) and main(argv=None)"
    )
    assert "unittest.mock" not in text and "._actions" not in text, f"{script.name} reaches into argparse"
    return tree


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda p: p.name)
def test_benchmarks_have_build_argument_parser_parse_args_and_main(script):
    check_parser_functions(script)


@pytest.mark.parametrize("script", SCRIPTS_WITH_MAIN, ids=lambda p: p.name)
def test_scripts_have_parse_args_and_main_and_do_nothing_on_import(script):
    tree = check_parser_functions(script)
    allowed = (
        ast.Import,
        ast.ImportFrom,
        ast.FunctionDef,
        ast.ClassDef,
        ast.Assign,
        ast.AnnAssign,
        ast.If,
        ast.Expr,
    )
    for node in tree.body:
        assert isinstance(node, allowed), f"{script.name}:{node.lineno} runs code at import time"
        if isinstance(node, ast.Expr):
            assert isinstance(node.value, ast.Constant), (
                f"{script.name}:{node.lineno} calls code at import time"
            )


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: run `make install` (requirements-dev.txt)")
    check = subprocess.run([ruff, "check", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([ruff, "format", "--check", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def markdown_anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    anchors, fence = set(), False
    for line in text.splitlines():
        fence ^= line.startswith("```")
        if not fence and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_readme_and_docs_relative_links_resolve():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in markdown_anchors(file.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    assert re.search(r"^make test\b", readme, re.MULTILINE), (
        "README must give `make test` as the test command"
    )
    assert (REPO_ROOT / ".ci" / "run").read_text().strip().endswith("make test")
    assert len(readme.splitlines()) <= 300, "README over 300 lines: move details to docs/"
