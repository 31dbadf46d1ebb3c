"""README.md's and docs/*.md's commands run as written, and the modules they name exist.

Each line of a ```bash block that starts with ``tunelab`` (also ``python -m tunelab`` and ``torchrun
... -m tunelab``), ``python``, ``make`` or ``.``/``source`` is checked without running anything heavy:

- tunelab: the command exists, is not the reader of a pipe (none reads standard input), and click
  parses the line as the CLI would (every ``--flag`` accepted, required arguments given, values of
  the right type); a train config's overrides validate;
- python: the script is in the repository and declares every ``--flag`` used (its argparse calls);
  ``python -m tunelab...``: the module exists;
- make: the target is in the Makefile; ``.``: the sourced file exists or a make target makes it;
- paths: what a line reads (a config, a script, a run directory, an input file) is a file of the
  repository, or an earlier line of the same document wrote it. ``tunelab eval runs/X`` needs a
  ``tunelab train`` (or ``tunelab demo``, or ``make demo``) before it whose run directory is runs/X,
  as the config's ``output_dir`` formats it; ``tunelab report DIR`` a compare/scale/advise writing DIR;
  ``echo ... > FILE`` writes FILE. Paths under .gitignore's folders (runs/, .venv/, examples/data/)
  never count as repository files: a command has to make them.

Commands quoted in running text (``tunelab compare X --tune lr``) name real commands, flags and
example files. The cheap commands (``tunelab --help``, ``methods``, ``tasks``, ``models`` and
``tunelab CMD --help`` for every command the documents use) run in a subprocess. Module names in
backticks (``tunelab.a.b.name``), ``src/tunelab/...py`` paths and the ``from tunelab... import`` lines
of ```python blocks must resolve. The checker checks itself on planted mistakes.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import typer

from tunelab.cli import app

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell"}
PLACEHOLDERS = {"run.yaml"}  # docs/distributed.md: the reader's own config
PATH_SUFFIXES = {".yaml", ".yml", ".py", ".sh", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet"}
READ_PARAMS = ("config", "target", "run_dir", "directory", "input_file")  # the CLI's input parameters
SWEEPS = ("compare", "advise", "scale")  # default output: runs/<command>-<config stem> (tunelab.sweeps)
CHEAP = ([], ["--help"], ["methods"], ["tasks"], ["models"])
GROUP = typer.main.get_command(app)
# typer 0.2x parses with its own copy of click; older ones with click itself
CLI_ERRORS = tuple({getattr(typer, "TyperException", click.ClickException), click.ClickException})


# -- reading the documents ---------------------------------------------------------------------------

def blocks(text: str, langs: set[str]) -> list[tuple[int, str]]:
    """(line number, logical line) of the fenced blocks in ``langs``; backslash continuations joined."""
    out, lang, pending, start = [], None, "", 0
    for i, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if lang is None:
            if s.startswith("```"):
                lang = s[3:].strip() or "-"
            continue
        if s == "```":
            lang = None
            continue
        if lang not in langs:
            continue
        if not pending:
            start = i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        out.append((start, pending + raw))
        pending = ""
    return out


@dataclass
class Command:
    where: str
    argv: list[str]
    redirects: list[str] = field(default_factory=list)
    piped: bool = False  # after a '|': it reads the previous command's output


def split_commands(where: str, line: str) -> list[Command]:
    """Simple commands of one shell line (split at && || ; | &), comments dropped, leading VAR=x dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    out, cur, redirects, piped = [], [], [], False
    tokens = iter(lex)
    for tok in tokens:
        if tok in ("&&", "||", ";", "|", "&"):
            out.append(Command(where, cur, redirects, piped))
            cur, redirects, piped = [], [], tok == "|"
        elif tok in (">", ">>"):
            redirects.append(next(tokens, ""))
        else:
            cur.append(tok)
    out.append(Command(where, cur, redirects, piped))
    for c in out:
        while c.argv and re.match(r"[A-Za-z_]\w*=", c.argv[0]):
            c.argv.pop(0)
    return [c for c in out if c.argv or c.redirects]


# -- the repository --------------------------------------------------------------------------------

@functools.cache
def ignored_dirs() -> tuple[tuple[str, ...], ...]:
    """.gitignore's folder patterns ('runs/', 'examples/data/'), as path parts."""
    gi = ROOT / ".gitignore"
    pats = []
    for ln in (gi.read_text().splitlines() if gi.exists() else []):
        ln = ln.strip()
        if ln.endswith("/") and not ln.startswith("#") and not any(c in ln for c in "*?[!"):
            pats.append(tuple(ln.strip("/").split("/")))
    return tuple(pats)


def made_at_run_time(rel: str) -> bool:
    parts = Path(rel).parts
    for pat in ignored_dirs():
        if len(pat) == 1 and pat[0] in parts[:-1] + ((parts[-1],) if len(parts) == 1 else ()):
            return True
        if len(pat) > 1 and parts[:len(pat)] == pat:
            return True
    return False


def in_repo(rel: str) -> bool:
    return (ROOT / rel).exists() and not made_at_run_time(rel)


def pathlike(value) -> bool:
    """A relative path the documents mean as a file or folder (not a model name, hub id or URL)."""
    if value is None:
        return False
    s = str(value)
    if not s or s.startswith(("/", "~", "-")) or "://" in s or "=" in s:
        return False
    p = Path(s)
    return p.suffix in PATH_SUFFIXES or p.parts[0] in TOP or p.parts[0] in ("runs", "out")


TOP = {p.name for p in ROOT.iterdir()}


@functools.cache
def make_targets() -> dict[str, tuple[list[str], list[str]]]:
    """Makefile target -> (prerequisites, recipe lines), variables substituted as the docs run them."""
    subst = [("$(VENV)/bin/tunelab", "tunelab"), ("$(PY)", "python"), ("$(PYTHON)", "python"), ("$(VENV)", ".venv")]

    def sub(text: str) -> str:
        for a, b in subst:
            text = text.replace(a, b)
        return text

    targets, current = {}, None
    for ln in (ROOT / "Makefile").read_text().splitlines():
        if ln.startswith("\t") and current is not None:
            targets[current][1].append(sub(ln.strip().lstrip("-@")))
            continue
        m = re.match(r"^([^\s:#=]+)\s*:(?!=)(.*)$", ln)
        current = None
        if m and m.group(1) != ".PHONY":
            current = sub(m.group(1))
            targets[current] = ([sub(t) for t in m.group(2).split()], [])
    return targets


@functools.cache
def argparse_flags(script: str) -> frozenset[str]:
    """The option strings a script's ``add_argument`` calls declare (read with ast, not run)."""
    tree = ast.parse((ROOT / script).read_text())
    flags = {"--help", "-h"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return frozenset(flags)


def module_exists(name: str) -> bool:
    sys.path.insert(0, str(SRC))
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
    finally:
        sys.path.remove(str(SRC))


# -- checking commands -----------------------------------------------------------------------------

@dataclass
class State:
    """What one document's earlier lines wrote, and what is wrong so far."""
    written: dict[str, str] = field(default_factory=dict)  # path -> the line that wrote it
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    tunelab_lines: list[list[str]] = field(default_factory=list)

    def write(self, path, where: str) -> None:
        if path is not None and str(path) and not str(path).startswith("/"):
            self.written.setdefault(os.path.normpath(str(path)), where)

    def read(self, path, where: str, what: str) -> None:
        if not pathlike(path) or str(path) in PLACEHOLDERS:
            return
        rel = os.path.normpath(str(path))
        if in_repo(rel):
            return
        if any(rel == w or Path(w) in Path(rel).parents for w in self.written):
            return
        made = " (it is made at run time: .gitignore)" if made_at_run_time(rel) else ""
        self.problems.append(f"{where}: {what} '{path}' is not in the repository{made} and no earlier "
                             f"command writes it (written so far: {sorted(self.written) or 'nothing'})")


def tunelab_args(argv: list[str]) -> list[str] | None:
    if argv[0] == "tunelab":
        return argv[1:]
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "tunelab"]:
        return argv[3:]
    if argv[0] == "torchrun" and "-m" in argv:
        i = argv.index("-m")
        if argv[i + 1:i + 2] == ["tunelab"]:
            return argv[i + 2:]
    return None


def check_tunelab(args: list[str], where: str, st: State) -> None:
    st.tunelab_lines.append(args)
    if not args or args[0].startswith("-"):
        if args not in ([], ["--help"]):
            st.problems.append(f"{where}: 'tunelab {' '.join(args)}': the top level takes only --help")
        return
    name, rest = args[0], args[1:]
    if name not in GROUP.commands:
        st.problems.append(f"{where}: no command 'tunelab {name}' (commands: {', '.join(sorted(GROUP.commands))})")
        return
    if "--help" in rest:
        return
    cmd = GROUP.commands[name]
    try:
        params = cmd.make_context(name, list(rest)).params
    except CLI_ERRORS as e:
        st.problems.append(f"{where}: 'tunelab {' '.join(args)}': {getattr(e, 'format_message', e.__str__)()}")
        return
    for key in READ_PARAMS:
        st.read(params.get(key), where, f"tunelab {name}'s {key}")
    overrides = list(params.get("overrides") or [])
    config = params.get("config")
    if name in ("train", "compare", "advise", "scale") and (config is None or str(config) in PLACEHOLDERS
                                                            or not (ROOT / str(config)).exists()):
        return
    try:
        if name == "train":
            from tunelab.config import load_config

            st.write(load_config(ROOT / config, overrides).run_dir(), where)
        elif name in SWEEPS:
            from tunelab.sweeps.compare import read_sweep_config, sweep_out_dir

            _, sweep = read_sweep_config(ROOT / config, overrides)
            st.write(sweep_out_dir(params.get("out"), sweep.get(name, {}), overrides,
                                   f"runs/{name}-{Path(config).stem}"), where)
        elif name == "demo":
            st.write(Path(params["out"]) / params["method"], where)
            st.write(Path(params["out"]) / "data", where)
        elif name in ("merge", "export"):
            st.write(params["out_dir"], where)
        elif name == "predict":
            st.write(params["out"], where)
    except (ValueError, FileNotFoundError) as e:
        st.problems.append(f"{where}: 'tunelab {' '.join(args)}': {e}")


def check_command(c: Command, st: State, report: bool = True) -> None:
    for path in c.redirects:
        st.write(path, c.where)
    if not c.argv:
        return
    argv, where = c.argv, c.where
    sink = st if report else State(written=st.written)
    st.checked += report and (tunelab_args(argv) is not None or argv[0] in ("python", "python3", "make", ".", "source"))
    args = tunelab_args(argv)
    if args is not None and c.piped:
        sink.problems.append(f"{where}: 'tunelab {' '.join(args)}' after a '|': no tunelab command reads "
                             "standard input, so the line shows only the last command's output")
    if args is not None:
        check_tunelab(args, where, sink)
    elif argv[0] in ("python", "python3"):
        if argv[1:2] == ["-m"]:
            mod = argv[2] if len(argv) > 2 else ""
            if mod == "venv":
                st.write(argv[-1], where)
            elif mod.startswith("tunelab") and not module_exists(mod):
                sink.problems.append(f"{where}: 'python -m {mod}': no such module")
            return
        script = argv[1] if len(argv) > 1 else ""
        if not in_repo(script):
            sink.problems.append(f"{where}: '{script}' is not a file of the repository")
            return
        if script.endswith(".py"):
            unknown = [a.split("=")[0] for a in argv[2:]
                       if a.startswith("--") and a.split("=")[0] not in argparse_flags(script)]
            if unknown:
                sink.problems.append(f"{where}: {script} declares no {', '.join(unknown)} "
                                     f"(it has {', '.join(sorted(argparse_flags(script)))})")
    elif argv[0] == "make":
        targets = make_targets()
        for t in [a for a in argv[1:] if not a.startswith("-") and "=" not in a] or list(targets)[:1]:
            if t not in targets:
                sink.problems.append(f"{where}: the Makefile has no target '{t}' ({', '.join(sorted(targets))})")
                continue
            seen, todo = [], [t]
            while todo:  # the target and its prerequisites, each recipe once
                n = todo.pop()
                if n in seen or n not in targets:
                    continue
                seen.append(n)
                todo += targets[n][0]
            for n in reversed(seen):
                for recipe in targets[n][1]:
                    for rc in split_commands(f"{where} (make {n}: {recipe})", recipe):
                        check_command(rc, st, report=False)  # harvest what it writes
    elif argv[0] in (".", "source"):
        sourced = argv[1] if len(argv) > 1 else ""
        if not in_repo(sourced) and not any(sourced == w or Path(w) in Path(sourced).parents for w in st.written):
            st.problems.append(f"{where}: '{argv[0]} {sourced}': no such file, and no earlier command makes it")


def check_document(name: str, text: str) -> State:
    st = State()
    for lineno, line in blocks(text, SHELL_FENCES):
        for c in split_commands(f"{name}:{lineno}", line):
            check_command(c, st)
    return st


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- the tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_commands_run_as_written(doc):
    st = check_document(doc_id(doc), doc.read_text())
    assert not st.problems, "\n".join(st.problems)


def test_readme_has_commands_to_check():
    st = check_document("README.md", (ROOT / "README.md").read_text())
    assert st.checked >= 20 and len(st.tunelab_lines) >= 15, st.checked


def cheap_commands() -> list[list[str]]:
    """tunelab --help, the listings, and --help of every command the documents use."""
    used, cheap = set(), [["--help"]]
    for doc in DOCS:
        for args in check_document(doc_id(doc), doc.read_text()).tunelab_lines:
            if args and not args[0].startswith("-"):
                used.add(args[0])
            if args in CHEAP or "--help" in args:
                cheap.append(args or ["--help"])
    cheap += [[cmd, "--help"] for cmd in sorted(used)]
    return [list(a) for a in dict.fromkeys(tuple(a) for a in cheap)]


def tunelab_exe() -> list[str]:
    script = Path(sys.executable).parent / "tunelab"  # the console script README's lines call
    return [str(script)] if script.exists() else [sys.executable, "-m", "tunelab"]


@pytest.mark.parametrize("args", cheap_commands(), ids=" ".join)
def test_cheap_commands_run(args):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TORCHELASTIC_RUN_ID", None)
    res = subprocess.run([*tunelab_exe(), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    listing = {"methods": "lora", "tasks": "sentiment", "models": "smollm2-135m"}
    expect = "Usage" if "--help" in args else listing[args[0]]
    assert expect in res.stdout, res.stdout


def test_the_listings_and_help_are_among_them():
    cmds = cheap_commands()
    assert all(c in cmds for c in (["--help"], ["methods"], ["tasks"], ["models"], ["train", "--help"]))


# -- commands named in the prose ------------------------------------------------------------------

INLINE = re.compile(r"`((?:tunelab|python|bash|make) [^`\n]+)`")


def options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))
            if o.startswith("-")} | {"--help"}


def inline_problems(name: str, text: str) -> list[str]:
    """Commands quoted in running text (synopses with RUN, OUT, [...] included): the command, its
    --flags and the repository files they name exist. Run directories are not followed here."""
    out = []
    for span in INLINE.findall(text):
        words = span.split("|")[0].split("&&")[0].split()
        flags = [w.strip("[]").split("=")[0] for w in words if re.match(r"\[?--[\w-]+", w)]
        files = [w for w in words if re.match(r"(examples|bench|docs|tests)/\S+\.(yaml|py|sh)$", w)]
        out += [f"{name}: `{span}`: '{f}' is not a file of the repository" for f in files if not in_repo(f)]
        if words[0] == "tunelab" and len(words) > 1 and not words[1].startswith("-"):
            cmd = GROUP.commands.get(words[1])
            if cmd is None:
                out.append(f"{name}: `{span}`: no command 'tunelab {words[1]}'")
                continue
            out += [f"{name}: `{span}`: tunelab {words[1]} has no {f}" for f in flags if f not in options(cmd)]
        elif words[0] == "python" and len(words) > 1 and words[1].endswith(".py") and in_repo(words[1]):
            out += [f"{name}: `{span}`: {words[1]} declares no {f}" for f in flags if f not in argparse_flags(words[1])]
        elif words[0] == "make" and len(words) > 1 and words[1] not in make_targets():
            out.append(f"{name}: `{span}`: the Makefile has no target '{words[1]}'")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_inline_commands_exist(doc):
    found = inline_problems(doc_id(doc), doc.read_text())
    assert not found, "\n".join(found)


def test_the_inline_check_catches():
    text = ("`tunelab evaluate RUN`, `tunelab merge RUN OUT [--dtyp bf16]`, `python bench/run.py --nope`, "
            "`tunelab compare examples/nope.yaml`, `make nope`, `tunelab advise X --no-verify`")
    found = "\n".join(inline_problems("planted", text))
    for says in ("no command 'tunelab evaluate'", "has no --dtyp", "declares no --nope", "'examples/nope.yaml'",
                 "no target 'nope'"):
        assert says in found, found
    assert "--no-verify" not in found


# -- module names ----------------------------------------------------------------------------------

DOTTED = re.compile(r"(?<![\w./-])tunelab(?:\.[A-Za-z_]\w*)+")
SRC_PATH = re.compile(r"(?<![\w.-])(?:src/)?tunelab/[\w/]+\.py")


def resolves(dotted: str) -> bool:
    """'tunelab.a.b.name': the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        mod = ".".join(parts[:i])
        if not module_exists(mod):
            continue
        obj = importlib.import_module(mod)
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def named_modules(text: str) -> tuple[list[str], list[str]]:
    dotted, paths = [], []
    for span in re.findall(r"`([^`\n]+)`", text):
        dotted += DOTTED.findall(span)
        paths += SRC_PATH.findall(span)
    for _, line in blocks(text, {"python"}):
        m = re.match(r"\s*from\s+(tunelab[\w.]*)\s+import\s+(.+)", line)
        if m:
            dotted += [f"{m.group(1)}.{n.strip().split(' as ')[0]}" for n in m.group(2).strip("()").split(",") if n.strip()]
        m = re.match(r"\s*import\s+(tunelab[\w.]*)", line)
        if m:
            dotted.append(m.group(1))
    return dotted, paths


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_named_modules_exist(doc):
    dotted, paths = named_modules(doc.read_text())
    missing = sorted({d for d in dotted if not resolves(d)})
    missing += sorted({p for p in paths if not (SRC / p.removeprefix("src/")).exists()})
    assert not missing, f"{doc_id(doc)} names what the package does not have: {missing}"


# -- the checker catches mistakes ----------------------------------------------------------------

def problems(*lines: str) -> list[str]:
    return check_document("planted", "```bash\n" + "\n".join(lines) + "\n```\n").problems


def test_a_consistent_sequence_passes():
    assert problems("make demo", ". .venv/bin/activate",
                    "tunelab train examples/sst2.yaml method.name=lora   # -> runs/sst2-lora",
                    "tunelab eval runs/sst2-lora", "tunelab chat runs/demo/lora",
                    "tunelab merge runs/demo/lora out/merged",
                    "tunelab compare examples/sst2_compare.yaml", "tunelab report runs/sst2-compare",
                    "echo '{}' > rows.jsonl", "tunelab predict runs/sst2-lora --input rows.jsonl -o p.jsonl",
                    "python bench/run.py --configs lora --ablate", "tunelab methods") == []


@pytest.mark.parametrize("line, says", [
    ("tunelab evaluate runs/x", "no command 'tunelab evaluate'"),
    ("tunelab train examples/sst2.yaml --steps 5", "No such option"),
    ("tunelab export runs/demo/lora", "Missing argument"),
    ("tunelab demo --steps five", "Invalid value for '--steps'"),
    ("tunelab train examples/nope.yaml", "'examples/nope.yaml' is not in the repository"),
    ("tunelab train examples/sst2.yaml method.nme=lora", "method"),
    ("tunelab eval runs/sentiment-lora", "'runs/sentiment-lora' is not in the repository (it is made at run time"),
    ("tunelab predict runs/demo/lora --input prompts.jsonl", "'prompts.jsonl' is not in the repository"),
    ("tunelab report runs/sst2-compare", "no earlier command writes it"),
    ("make nope", "no target 'nope'"),
    ("python bench/run.py --nope", "declares no --nope"),
    ("python bench/nope.py", "not a file of the repository"),
    ("python -m tunelab.nope", "no such module"),
    (". .venv/bin/activate", "no earlier command makes it"),
    ("tunelab methods | tunelab nope", "no command 'tunelab nope'"),
    ("tunelab methods | tunelab tasks", "after a '|'"),
])
def test_the_checker_catches(line, says):
    found = problems("tunelab train examples/sst2.yaml method.name=lora", line)
    assert found and says in "\n".join(found), found


def test_the_module_check_catches_missing_names():
    assert not resolves("tunelab.no_such_room.inference") and not resolves("tunelab.evaluation.scoring.no_such_name")
    assert resolves("tunelab.evaluation.inference.inference") and resolves("tunelab.results.read_metrics")
    text = "`tunelab.no_such_room.x`, `src/tunelab/no_such_room/x.py`\n```python\nfrom tunelab.api import nope\n```\n"
    dotted, paths = named_modules(text)
    assert dotted == ["tunelab.no_such_room.x", "tunelab.api.nope"] and paths == ["src/tunelab/no_such_room/x.py"]
