"""(description, code) pairs from Python source with `ast`.

Description: a function's first docstring paragraph, whitespace folded. Code: its source lines
(decorators kept) without the docstring, dedented by its first line. With `Filters.unlabelled`,
also every function whole and each module in chunks cut at top-level statements.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import io
import re
import warnings

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclasses.dataclass(frozen=True)
class Pair:
  description: str
  code: str
  path: str       # source label + relative path, e.g. "stdlib/json/decoder.py"
  name: str       # qualified name, e.g. "JSONDecoder.decode"
  lineno: int     # 1-based line of the first decorator or `def`
  source: str     # the source spec it came from, e.g. "stdlib", "csn:/data/python"
  partition: str = ""  # "train" | "valid" | "test" when the source fixes it, else ""


@dataclasses.dataclass(frozen=True)
class Unlabelled:
  """Code without a description: a whole function, or a chunk of a module (name "<module>")."""
  code: str
  path: str
  name: str
  lineno: int
  source: str
  keys: tuple[bytes, ...]  # code_key of the code, and of the code without its docstring if any


@dataclasses.dataclass(frozen=True)
class Filters:
  min_desc_words: int = 3
  max_code_lines: int = 80
  max_code_chars: int = 4000
  max_file_bytes: int = 1 << 20  # larger source files are skipped unread (generated code, data)
  # Code search: every function, none filtered out (description "" without a docstring).
  every_function: bool = False
  # Also unlabelled code (`Unlabelled`) from Python files, in the same list as the pairs.
  unlabelled: bool = False

  def reason_to_skip(self, description: str, code: str) -> str | None:
    if self.every_function:
      return None
    if len(description.split()) < self.min_desc_words:
      return "description too short"
    if code.count("\n") + 1 > self.max_code_lines:
      return "code too many lines"
    if len(code) > self.max_code_chars:
      return "code too many chars"
    return None


def first_paragraph(docstring: str) -> str:
  """The first paragraph of a docstring with all whitespace runs folded to one space."""
  return " ".join(_PARAGRAPH_BREAK.split(docstring.strip(), maxsplit=1)[0].split())


def normalise_code(code: str) -> str:
  """Code with trailing whitespace and blank lines dropped: the key for exact dedupe."""
  return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())


def code_key(code: str) -> bytes:
  return hashlib.blake2b(normalise_code(code).encode("utf-8", "surrogatepass"),
                         digest_size=16).digest()


def split_lines(text: str) -> list[str]:
  """Lines as `ast` counts them: only \\n, \\r\\n and \\r end a line (not \\f or U+2028)."""
  return io.StringIO(text, newline="").readlines()


def _docstring_node(node: ast.AST) -> ast.Expr | None:
  body = getattr(node, "body", None)
  if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
      and isinstance(body[0].value.value, str):
    return body[0]
  return None


def _first_line(node: ast.stmt) -> int:
  """1-based line of the node's first decorator, or of the node itself."""
  return min([d.lineno for d in getattr(node, "decorator_list", ())] + [node.lineno])


def _dedent(kept: list[str]) -> str:
  indent = re.match(r"[ \t]*", kept[0]).group(0)
  return "".join(line[len(indent):] if line.startswith(indent) else line
                 for line in kept).rstrip() + "\n"


def _function_source(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str:
  """The whole source of `node` (decorators and docstring kept), dedented by its first line."""
  return _dedent(lines[_first_line(node) - 1:node.end_lineno])


def _function_code(node: ast.FunctionDef | ast.AsyncFunctionDef, doc: ast.Expr,
                   lines: list[str]) -> str | None:
  """Source of `node` without its docstring, or None when that cannot be cut out cleanly."""
  d0, d1 = doc.lineno - 1, doc.end_lineno - 1
  before = lines[d0].encode("utf-8", "surrogatepass")[:doc.col_offset].strip()  # offsets: bytes
  after = lines[d1].encode("utf-8", "surrogatepass")[doc.end_col_offset:].strip()
  if before or (after and not after.startswith(b"#")):
    return None  # the docstring shares a line with other code
  if len(node.body) == 1:
    return None  # nothing but the docstring: no code to learn
  return _dedent(lines[_first_line(node) - 1:d0] + lines[d1 + 1:node.end_lineno])


_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def _walk(node: ast.AST, prefix: str):
  """(qualified name, node) of every function, nested ones too; searches only statement
  blocks (a def cannot hide in an expression): faster than `ast.walk`."""
  for field in _BLOCKS:
    for child in getattr(node, field, None) or ():
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield prefix + child.name, child
        yield from _walk(child, f"{prefix}{child.name}.")
      elif isinstance(child, ast.ClassDef):
        yield from _walk(child, f"{prefix}{child.name}.")
      elif isinstance(child, ast.stmt | ast.excepthandler | ast.match_case):
        yield from _walk(child, prefix)


def parse(text: str) -> ast.Module | None:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # invalid escape sequences etc. in old code
      return ast.parse(text)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None


def module_chunks(tree: ast.Module, lines: list[str], filters: Filters) -> list[tuple[int, str]]:
  """(first line, text) of a module in chunks within the code length limits, cut between
  top-level statements (a statement too long for one, between lines; a too long line dropped).
  """
  starts = sorted({0} | {_first_line(n) - 1 for n in tree.body})
  pieces: list[tuple[int, int]] = []   # (start, end) line ranges that each fit alone
  for a, b in zip(starts, starts[1:] + [len(lines)]):
    while a < b:
      end, chars = a, 0
      while end < b and end - a < filters.max_code_lines and \
          chars + len(lines[end]) <= filters.max_code_chars:
        chars += len(lines[end])
        end += 1
      if end == a:   # one line over the char limit
        a += 1
        continue
      pieces.append((a, end))
      a = end
  chunks: list[list[int]] = []   # [start, end, chars]: consecutive pieces merged while they fit
  for a, b in pieces:
    n = sum(len(lines[i]) for i in range(a, b))
    if chunks and chunks[-1][1] == a and b - chunks[-1][0] <= filters.max_code_lines and \
        chunks[-1][2] + n <= filters.max_code_chars:
      chunks[-1][1:] = [b, chunks[-1][2] + n]
    else:
      chunks.append([a, b, n])
  out = []
  for a, b, _ in chunks:
    while a < b and not lines[a].strip():
      a += 1
    if a < b:
      out.append((a + 1, "".join(lines[a:b]).rstrip() + "\n"))
  return out


def _unlabelled(tree: ast.Module, lines: list[str], path: str, source: str,
                filters: Filters, skipped: collections.Counter) -> list[Unlabelled]:
  out = []
  for name, node in _walk(tree, ""):
    code = _function_source(node, lines)
    if code.count("\n") + 1 > filters.max_code_lines or len(code) > filters.max_code_chars:
      skipped["unlabelled: function too long (its module's chunks hold it)"] += 1
      continue
    doc = _docstring_node(node)
    bare = _function_code(node, doc, lines) if doc is not None else None
    keys = (code_key(code),) + ((code_key(bare),) if bare is not None else ())
    out.append(Unlabelled(code, path, name, _first_line(node), source, keys))
  for lineno, code in module_chunks(tree, lines, filters):
    out.append(Unlabelled(code, path, "<module>", lineno, source, (code_key(code),)))
  return out


def mine_text(text: str, path: str, source: str, filters: Filters,
              skipped: collections.Counter, partition: str = "") -> list[Pair | Unlabelled]:
  """Pairs of the documented functions in `text` (one module; every function with
  `filters.every_function`), then its unlabelled code with `filters.unlabelled`."""
  tree = parse(text)
  if tree is None:
    skipped["file: syntax error"] += 1
    return []
  lines = split_lines(text)
  pairs: list[Pair | Unlabelled] = []
  for name, node in _walk(tree, ""):
    doc = _docstring_node(node)
    lineno = _first_line(node)
    if doc is None:
      if filters.every_function:
        pairs.append(Pair("", _function_source(node, lines), path, name, lineno, source,
                          partition))
      continue
    description = first_paragraph(doc.value.value)
    code = _function_code(node, doc, lines)
    if code is None and filters.every_function:
      code = _function_source(node, lines)
    if code is None:
      skipped["pair: no code besides docstring"] += 1
      continue
    reason = filters.reason_to_skip(description, code)
    if reason:
      skipped["pair: " + reason] += 1
      continue
    pairs.append(Pair(description, code, path, name, lineno, source, partition))
  if filters.unlabelled:
    pairs += _unlabelled(tree, lines, path, source, filters, skipped)
  return pairs


def strip_docstring(code: str) -> str | None:
  """One function's source (as CodeSearchNet stores it) without its docstring (unchanged when
  it has none); None if unparsable."""
  tree = parse(code)
  if tree is None or not tree.body or not isinstance(
      tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
    return None
  node = tree.body[0]
  lines = split_lines(code)
  doc = _docstring_node(node)
  return _function_source(node, lines) if doc is None else _function_code(node, doc, lines)
