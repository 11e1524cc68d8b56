"""The ast miner: what becomes the description, what becomes the code, what is skipped."""
import ast
import collections
import textwrap

from flax_albert_code.data import mining

SOURCE = textwrap.dedent('''\
    import functools

    def top(a, b):
        """Add two numbers
        and return   the sum.

        Longer explanation that is not part of the description.
        """
        return a + b


    class Box:
        """A class docstring is not a pair."""

        @functools.lru_cache()
        @staticmethod
        def cached(x):
            """Compute a cached value for x."""
            # a comment survives
            return x * 2

        def outer(self):
            """Outer method with a nested helper."""
            def inner(y):
                """Inner helper doubles y here."""
                return y * 2
            return inner(1)

        def abstract(self):
            """Only a docstring, no code at all."""

        def inline(self): "Docstring on the def line is skipped."; return 1

        def short(self):
            """Too short."""
            return 0

    if True:
        def conditional():
            """Defined inside an if block."""
            return "caf\u00e9 \u2581"
    ''')


def mine(text=SOURCE, filters=mining.Filters()):
  skipped = collections.Counter()
  pairs = mining.mine_text(text, "pkg/mod.py", "dir:pkg", filters, skipped)
  return {p.name: p for p in pairs}, skipped


def test_descriptions_codes_and_names():
  pairs, skipped = mine()
  assert sorted(pairs) == ["Box.cached", "Box.outer", "Box.outer.inner", "conditional", "top"]
  top = pairs["top"]
  assert top.description == "Add two numbers and return the sum."
  assert top.code == "def top(a, b):\n    return a + b\n"
  assert (top.lineno, top.path, top.source, top.partition) == (3, "pkg/mod.py", "dir:pkg", "")
  cached = pairs["Box.cached"]
  assert cached.code == ("@functools.lru_cache()\n@staticmethod\ndef cached(x):\n"
                         "    # a comment survives\n    return x * 2\n")
  assert cached.lineno == 15  # the first decorator's line
  assert pairs["Box.outer"].code.startswith("def outer(self):\n    def inner(y):\n")
  assert '"""' not in pairs["Box.outer"].code.split("\n")[1]
  assert pairs["conditional"].code.endswith('return "caf\u00e9 \u2581"\n')
  for p in pairs.values():
    assert ast.parse(p.code)  # every extracted snippet is valid Python on its own
  assert skipped == {"pair: no code besides docstring": 2, "pair: description too short": 1}


def test_filters_count_reasons():
  pairs, skipped = mine(filters=mining.Filters(min_desc_words=6, max_code_lines=3,
                                               max_code_chars=1000))
  assert sorted(pairs) == ["top"]  # 7 words, 2 lines
  assert skipped["pair: code too many lines"] == 2  # cached (5 lines), outer (4)
  assert skipped["pair: description too short"] == 3  # short, inner, conditional
  _, skipped = mine(filters=mining.Filters(max_code_chars=10))
  assert skipped["pair: code too many chars"] == 5


def test_form_feed_and_non_ascii_keep_line_numbers_right():
  # \x0c is not a line break for ast; byte offsets of non-ASCII text must not shift the cut.
  text = ('x = 1\x0c\n\ndef f():\n    "\u00e9\u00e9 docstring with words"  # note\n'
          '    return "\u00e9"\n')
  pairs, _ = mine(text)
  assert pairs["f"].code == 'def f():\n    return "\u00e9"\n'
  assert pairs["f"].lineno == 3


def test_syntax_error_is_counted_not_raised():
  pairs, skipped = mine("def broken(:\n    '''Doc of a broken function.'''\n")
  assert pairs == {} and skipped == {"file: syntax error": 1}


def test_first_paragraph_and_normalised_key():
  assert mining.first_paragraph("  One\ttwo\n   three.\n\n  Rest.") == "One two three."
  assert (mining.code_key("def f():\n    return 1   \n\n")
          == mining.code_key("def f():\n    return 1"))
  assert mining.code_key("def f():\n    return 1") != mining.code_key("def f():\n    return 2")


def test_strip_docstring_for_codesearchnet_snippets():
  code = 'def f(x):\n    """Docstring."""\n    return x\n'
  assert mining.strip_docstring(code) == "def f(x):\n    return x\n"
  assert mining.strip_docstring("def g():\n    return 2\n") == "def g():\n    return 2\n"
  assert mining.strip_docstring("print 'python 2'") is None
  assert mining.strip_docstring("x = 1\n") is None


def test_every_function_for_search_keeps_undocumented_and_unfiltered_ones():
  text = ('@deco\ndef documented(a):\n  """Return a plus one, the documented way."""\n'
          "  return a + 1\n\n"
          "def bare(x):\n  return x\n\n"
          'def tiny():\n  """Doc."""\n  return 0\n\n'
          'class K:\n  def only_doc(self):\n    """Nothing else here at all."""\n')
  skipped = collections.Counter()
  every = mining.mine_text(text, "m.py", "dir:x", mining.Filters(every_function=True), skipped)
  by_name = {p.name: p for p in every}
  assert list(by_name) == ["documented", "bare", "tiny", "K.only_doc"] and not skipped
  assert by_name["documented"].code == "@deco\ndef documented(a):\n  return a + 1\n"
  assert by_name["bare"].description == "" and by_name["bare"].code == "def bare(x):\n  return x\n"
  assert by_name["tiny"].description == "Doc."          # too short to train on, still searchable
  assert by_name["K.only_doc"].code.startswith("def only_doc(self):\n  \"\"\"Nothing")
  assert by_name["bare"].lineno == 6 and by_name["documented"].lineno == 1
  trained = mining.mine_text(text, "m.py", "dir:x", mining.Filters(), collections.Counter())
  assert [p.name for p in trained] == ["documented"]
