"""The README's promises: its set-up commands are CI's, its tables are the scripts' output."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def first_commands() -> list[list[str]]:
    """The README's two set-up commands, each split at ``&&`` into words."""
    block = re.search(r"```bash\n(.*?)```", README, re.DOTALL)
    assert block, "the README starts with a bash block"
    lines = [line for line in block.group(1).splitlines() if not line.startswith("#")]
    assert len(lines) == 2, "two commands: the demo, then the tests"
    return [[shlex.split(part) for part in line.split(" && ")] for line in lines]


def ci_commands() -> list[list[str]]:
    """The words of every command line of .ci/run (redirections and `if !` dropped)."""
    words = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        line = re.sub(r"^if ! |;.*$| *[0-9]?>.*$", "", line.strip())
        if line and not line.startswith(("#", "set ", "cd ", "export ", "fi", "tail ", "exit")):
            words.append(shlex.split(line))
    return words


def test_the_readme_test_command_is_the_one_ci_runs():
    venv, install, tests = first_commands()[1]
    ci = ci_commands()
    assert venv in ci and install in ci and tests in ci
    assert ci.index(venv) < ci.index(install) < ci.index(tests) == len(ci) - 1


def test_the_readme_demo_command_installs_like_ci_and_trains_the_demo_config():
    venv, install, train = first_commands()[0]
    ci = ci_commands()
    assert venv in ci
    ci_install = next(words for words in ci if words[:2] == [".venv/bin/pip", "install"])
    assert install == [*ci_install[:-1], "."]  # the same install, without the dev extra
    assert train[:2] == [".venv/bin/agmm", "fit"] and (ROOT / train[-1]).is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_tables_are_the_scripts_output_and_links_resolve(page):
    text = page.read_text()
    for source, body in re.findall(r"<!-- (results/[\w.-]+) -->\n(.*?)<!-- end -->", text, re.S):
        assert body.strip() == (ROOT / source).read_text().strip(), "rerun update_readme.py"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
