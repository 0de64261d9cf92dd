#!/usr/bin/env python3
"""Finds source files that import each other, directly or through a longer circle.

    scripts/check_imports.py [CRATE_SRC_DIR ...]     (default: host/src engine/src)

A file imports another when one of its paths (`use` items and paths written in the code,
`crate::`, `super::`, `self::` or a child module's name) names an item defined in the other.
A re-export (`pub use child::Item` in a `mod.rs`) is followed to the file that defines the
item, so a parent that gathers its children's names is not an importer of its own. Unit-test
modules (`#[cfg(test)] mod tests { ... }`) are left out: they import their file by design.
Exits 1 and names each circle, smallest first, when there is one.
"""

import re
import sys
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments_and_strings(text: str) -> str:
    """The code without comments, string and char literals (which may hold `crate::x`)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not text[i - 1].isalnum()):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def drop_test_modules(code: str) -> str:
    """Removes `#[cfg(test)] mod NAME { ... }` blocks."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+" + IDENT + r"\s*\{", code)
        if not m:
            return code
        depth, i = 1, m.end()
        while i < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        code = code[: m.start()] + code[i:]


def expand_use_tree(tree: str, prefix=()):
    """`a::{b, c::{d, e as f}, self}` → [(a,b), (a,c,d), (a,c,e), (a,)]."""
    tree = tree.strip()
    parts, depth, start = [], 0, 0
    # Split the top level of `prefix::{...}` groups.
    m = re.match(r"^((?:" + IDENT + r"\s*::\s*)*)\{(.*)\}$", tree, re.S)
    if m:
        head = tuple(s.strip() for s in m.group(1).split("::") if s.strip())
        inner = m.group(2)
        for i, c in enumerate(inner):
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            elif c == "," and depth == 0:
                parts.append(inner[start:i])
                start = i + 1
        parts.append(inner[start:])
        paths = []
        for part in parts:
            if part.strip():
                paths += expand_use_tree(part, prefix + head)
        return paths
    tree = re.sub(r"\s+as\s+" + IDENT + "$", "", tree)
    segments = tuple(s.strip() for s in tree.split("::") if s.strip())
    if segments and segments[-1] == "self":
        segments = segments[:-1]
    if segments and segments[-1] == "*":
        segments = segments[:-1]
    return [prefix + segments]


class Crate:
    def __init__(self, src: Path):
        self.src = src
        self.files = {}  # module path tuple -> Path
        self.code = {}  # Path -> code without comments/tests
        root = src / "lib.rs" if (src / "lib.rs").exists() else src / "main.rs"
        self._walk(root, ())

    def _walk(self, path: Path, module):
        self.files[module] = path
        code = drop_test_modules(strip_comments_and_strings(path.read_text()))
        self.code[path] = code
        base = path.parent if path.name in ("mod.rs", "lib.rs", "main.rs") else path.with_suffix("")
        for m in re.finditer(r"(?m)^\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", code):
            name = m.group(1)
            for child in (base / f"{name}.rs", base / name / "mod.rs"):
                if child.exists():
                    self._walk(child, module + (name,))
                    break

    def module_of(self, path: Path):
        return next(m for m, p in self.files.items() if p == path)

    def reexports(self, module):
        """Names a module brings in with `use` (its children see even the private ones):
        name -> full path it stands for."""
        code = self.code[self.files[module]]
        names = {}
        for m in re.finditer(r"\buse\s+([^;]+);", code):
            for original in expand_use_tree(m.group(1)):
                full = self.absolute(module, original)
                if full:
                    names[full[-1]] = full
        return names

    def absolute(self, module, segments):
        """A path as written in `module`, from the crate root; None for another crate's."""
        if not segments:
            return None
        first, rest = segments[0], segments[1:]
        if first == "crate":
            return rest
        if first == "self":
            return module + rest
        if first == "super":
            up = module
            while segments and segments[0] == "super":
                up, segments = up[:-1], segments[1:]
            return up + tuple(segments)
        if module + (first,) in self.files:
            return module + segments
        return None

    def definer(self, full, seen=None):
        """The module whose file defines the item at `full` (re-exports followed)."""
        seen = seen or set()
        if full in seen:
            return None
        seen.add(full)
        # The longest prefix that is a module file.
        for cut in range(len(full), -1, -1):
            if full[:cut] in self.files:
                module, rest = full[:cut], full[cut:]
                break
        if not rest:
            return module
        exported = self.reexports(module).get(rest[0])
        if exported and exported != module + rest[:1]:
            return self.definer(exported + rest[1:], seen)
        return module

    def imports(self):
        """File → the set of files it imports."""
        edges = {}
        for module, path in self.files.items():
            code = self.code[path]
            paths = []
            for m in re.finditer(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", code):
                for segments in expand_use_tree(m.group(2)):
                    # A re-export only gathers a name for others, unless this file uses it too.
                    name = segments[-1] if segments else ""
                    if m.group(1) and len(re.findall(r"\b%s\b" % re.escape(name), code)) < 2:
                        continue
                    paths.append(segments)
            # Paths written in the code: from the crate, a parent, or a child module.
            children = [m[-1] for m in self.files if m[:-1] == module and m != module]
            heads = "|".join(["crate", "super", "self"] + children)
            for m in re.finditer(
                r"(?<![:\w])((?:" + heads + r")(?:\s*::\s*" + IDENT + r")+)", code
            ):
                paths.append(tuple(s.strip() for s in m.group(1).split("::")))
            targets = set()
            for segments in paths:
                full = self.absolute(module, segments)
                if full is None:
                    continue
                definer = self.definer(full)
                if definer is not None and definer != module:
                    # A `pub use child::X` in a parent is the parent gathering, not importing.
                    targets.add(self.files[definer])
            edges[path] = targets
        return edges


def circles(edges):
    """Strongly connected components with more than one file (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return sorted(out, key=len)


def main():
    root = Path(__file__).resolve().parent.parent
    dirs = [Path(d) for d in sys.argv[1:]] or [root / "host/src", root / "engine/src"]
    found = 0
    for src in dirs:
        crate = Crate(src.resolve())
        edges = crate.imports()
        # Named from the crate's folder (host/src/...), wherever the checkout is.
        base = src.resolve().parent.parent
        for component in circles(edges):
            found += 1
            names = [str(p.relative_to(base)) for p in component]
            pairs = [
                f"  {a.relative_to(base)} -> {b.relative_to(base)}"
                for a in component
                for b in sorted(edges[a])
                if b in component
            ]
            print(f"import circle of {len(names)} files:\n" + "\n".join(pairs))
    if found:
        sys.exit(1)
    print("no import circles in " + ", ".join(str(d) for d in dirs))


if __name__ == "__main__":
    main()
