"""The layout shows the architecture, and no unit grows past what one reader can hold: an ast walk over
the package and the benchmarks (no class over 250 lines, no function over 60, no module over 500), and
lora_demo/ is split into sub-packages by concern."""

import ast

from conftest import ROOT

LIMITS = {"module": 500, "class": 250, "function": 60}
PACKAGES = ("core", "data", "training", "adapters", "analysis", "lab", "present", "app")


def _sizes():
    for path in sorted([*(ROOT / "lora_demo").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        source = path.read_text()
        where = path.relative_to(ROOT).as_posix()
        yield "module", where, len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                yield "class", f"{where}:{node.name}", node.end_lineno - node.lineno + 1
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield "function", f"{where}:{node.name}", node.end_lineno - node.lineno + 1


def test_no_module_class_or_function_is_over_its_limit():
    sizes = list(_sizes())
    assert len(sizes) > 300                     # the walk saw the code
    over = [(kind, name, n) for kind, name, n in sizes if n > LIMITS[kind]]
    assert not over, over


def test_the_package_is_split_by_concern():
    top = ROOT / "lora_demo"
    assert all((top / p / "__init__.py").is_file() for p in PACKAGES)
    loose = sorted(p.name for p in top.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "cli.py"], loose
    assert not (top / "bench.py").exists() and (ROOT / "benchmarks" / "bench.py").is_file()
    plotly_users = sorted(p.relative_to(ROOT).as_posix() for p in top.rglob("*.py")
                          if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "plotly" in (getattr(n, "module", "") or
                                 " ".join(a.name for a in n.names)) for n in ast.walk(ast.parse(p.read_text()))))
    assert plotly_users == ["lora_demo/present/plots.py"], plotly_users


def test_each_app_section_builds_into_a_dataclass():
    """One section per file under app/sections/, and its build() returns a dataclass of what the page
    chains on (no dicts of string keys)."""
    sections = sorted((ROOT / "lora_demo" / "app" / "sections").glob("[!_]*.py"))
    assert len(sections) >= 5
    for path in sections:
        tree = ast.parse(path.read_text())
        dataclasses = {n.name for n in tree.body if isinstance(n, ast.ClassDef)
                       and any("dataclass" in ast.unparse(d) for d in n.decorator_list)}
        build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
        returned = ast.unparse(build.returns) if build.returns else None
        assert returned in dataclasses, (path.name, returned, dataclasses)


def test_every_binary_in_the_tree_goes_through_lfs_on_a_space():
    """A Space refuses plain files over 10 MB: .gitattributes routes every tracked binary through LFS
    (git's own answer, from `git check-attr`), and leaves text files as text."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [p for p in files.decode().split("\0") if p and (ROOT / p).is_file()]
    binary = [p for p in paths if b"\0" in (ROOT / p).read_bytes()[:8192]]
    assert {"assets/tiny/tf_model.h5", "docs/img/screenshot.png"} <= set(binary)
    out = subprocess.run(["git", "check-attr", "filter", "--", *binary, "app.py", "README.md"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    attr = dict(line.rsplit(": filter: ", 1) for line in out.splitlines())
    assert [p for p in binary if attr[p] != "lfs"] == []
    assert attr["app.py"] == attr["README.md"] == "unspecified"
