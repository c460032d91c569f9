"""The documents stay in step with the code: docs/config.md is what scripts/config_table.py generates from the
scripts' `config` dicts (and the generator reads every key, nested sections, None, strings, numbers and lists
included), every relative link and #anchor in README.md and docs/*.md resolves, every repository file a document
names exists, and the README stays a front door (under 20 KB). The documents' YAML and launch examples are run in
tests/test_first_hour.py, item 7. No models are built."""

import glob
import importlib.util
import os
import re

import pytest
from conftest import ROOT

README_LIMIT = 20_000  # bytes: the README is the entrance; depth goes to docs/


def load_generator():
    spec = importlib.util.spec_from_file_location("config_table", os.path.join(ROOT, "scripts", "config_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_table = load_generator()


def documents() -> dict[str, str]:
    paths = ["README.md"] + sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return {path: open(os.path.join(ROOT, path), encoding="utf-8").read() for path in paths}


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code removed (links and headings in them do not count)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def anchors(text: str) -> set[str]:
    """GitHub's anchors for a document's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-',
    repeats numbered -1, -2, ..."""
    seen, result = {}, set()
    for heading in re.findall(r"(?m)^#+ (.+?)\s*$", re.sub(r"```.*?```", "", text, flags=re.S)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


# --- docs/config.md is generated -------------------------------------------------------------------------------------


def test_config_doc_is_what_the_generator_writes():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as handle:
        current = handle.read()
    assert current == config_table.render(), (
        "docs/config.md is out of date with the scripts' config dicts: run "
        "`python scripts/config_table.py > docs/config.md` (or `python scripts/config_table.py --write`)")


@pytest.mark.parametrize("script", ["distil_logits", "distil_hidden", "distil_dpo"])
def test_config_table_lists_every_key_of_the_script(script):
    module = __import__(script)

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    with open(os.path.join(ROOT, f"{script}.py"), encoding="utf-8") as handle:
        rows = config_table.config_rows(handle.read())
    assert [path for path, _, _ in rows] == list(leaves(module.config))
    assert all(meaning for _, _, meaning in rows), "every config value needs a trailing comment saying what it means"
    loss_memory = dict((path, meaning) for path, _, meaning in rows)["distillation.loss_memory_mb"]
    assert "per GPU" in loss_memory


SOURCE = '''
from data import TEMPLATE
config = {
    "name": "x",  # a label | with a pipe
    # --- data ---
    "data": {
        "path": None,  # None: all
        "sizes": [1, 2,
                  3],  # a list over two lines
        "nested": {"deep": 2e-5},  # a section inside a section
        "empty": {},  # an empty dict is a value, not a section
        "bare": True,
    },
    "training": {
        "learning_rate": 2e-5,  # peak, as written (not 2e-05)
        "template": TEMPLATE,  # an imported constant
        "long": "%s",  # a long string is cut
        "blank": "",  # an empty string
    },
}
other = {"ignored": 1}  # not the config
''' % ("y" * 70)


def test_generator_reads_nested_sections_and_every_kind_of_default():
    assert config_table.config_rows(SOURCE) == [
        ("name", "x", "a label | with a pipe"),
        ("data.path", "None", "None: all"),
        ("data.sizes", "[1, 2, 3]", "a list over two lines"),
        ("data.nested.deep", "2e-5", "a section inside a section"),
        ("data.empty", "{}", "an empty dict is a value, not a section"),
        ("data.bare", "True", ""),
        ("training.learning_rate", "2e-5", "peak, as written (not 2e-05)"),
        ("training.template", "TEMPLATE", "an imported constant"),
        ("training.long", repr("y" * 40) + "...", "a long string is cut"),
        ("training.blank", '""', "an empty string"),
    ]
    assert config_table.imported_names(SOURCE) == {"TEMPLATE": "data"}
    table = config_table.table(config_table.config_rows(SOURCE)[:1])
    assert "| `name` | `x` | a label \\| with a pipe |" in table  # a pipe in a comment does not split the cell


def test_generator_refuses_what_it_cannot_tabulate():
    with pytest.raises(ValueError, match="no top-level `config"):
        config_table.config_rows("settings = {'a': 1}\n")
    with pytest.raises(ValueError, match=r"\*\*"):
        config_table.config_rows("base = {}\nconfig = {**base, 'a': 1}\n")


def test_check_flag_fails_on_a_stale_doc(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config_table, "ROOT", str(tmp_path))
    monkeypatch.setattr(config_table, "render", lambda root=None: "generated\n")
    os.makedirs(tmp_path / "docs")
    (tmp_path / "docs" / "config.md").write_text("edited by hand\n")
    assert config_table.main(["--check"]) == 1
    assert "python scripts/config_table.py > docs/config.md" in capsys.readouterr().err
    assert config_table.main(["--write"]) == 0
    assert config_table.main(["--check"]) == 0


# --- links, named files, size ----------------------------------------------------------------------------------------


def test_relative_links_and_anchors_resolve():
    docs = documents()
    broken = []
    for path, text in docs.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code(text)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(os.path.join(ROOT, resolved)):
                broken.append(f"{path}: {target} (no file {resolved})")
            elif anchor and resolved.endswith(".md"):
                text_of_target = docs.get(resolved) or open(os.path.join(ROOT, resolved), encoding="utf-8").read()
                if anchor not in anchors(text_of_target):
                    broken.append(f"{path}: {target} (no heading #{anchor} in {resolved})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_files_the_documents_name_exist():
    pattern = r"\b((?:bench|scripts|examples|tests|deepspeed_configs|docs)/[\w./-]+\.(?:py|sh|yaml|json|md))\b"
    missing = [f"{path}: {name}" for path, text in documents().items() for name in set(re.findall(pattern, text))
               if not os.path.exists(os.path.join(ROOT, name))
               and not name.startswith("examples/output/")]  # what the demo writes (gitignored), quoted as its source
    assert not missing, "documents name files that do not exist:\n" + "\n".join(sorted(missing))


def test_readme_is_a_front_door():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size <= README_LIMIT, f"README.md is {size} bytes: move depth to docs/ (limit {README_LIMIT})"
    readme = documents()["README.md"]
    for heading in ("## Quickstart", "## Running your own experiment", "## Config keys", "## File layout", "## Read on"):
        assert heading in readme, f"README.md lost its '{heading}' section"
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", readme))
    unlinked = {os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))} - linked
    assert not unlinked, f"README.md's 'Read on' does not link {sorted(unlinked)}"
