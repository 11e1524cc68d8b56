"""The playground page in headless Chromium (Debian's `chromium`): a description submitted from
the page comes back as highlighted code, the same code the API gives."""
from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
import urllib.parse

import pytest

from export_util import Server, request, shared_export

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it with "
                             "apt-get install chromium; it failed or has not run here)")


class _Text(html.parser.HTMLParser):
  """The text inside the element with `id`, and the spans' classes there."""

  def __init__(self, element_id: str):
    super().__init__(convert_charrefs=True)
    self.element_id, self.depth, self.text, self.classes = element_id, 0, [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if self.depth or attrs.get("id") == self.element_id:
      self.depth += 1
      if tag == "span":
        self.classes.append(attrs.get("class"))

  def handle_endtag(self, tag):
    if self.depth:
      self.depth -= 1

  def handle_data(self, data):
    if self.depth:
      self.text.append(data)


def _find(dom: str, element_id: str) -> _Text:
  p = _Text(element_id)
  p.feed(dom)
  return p


def test_playground_submits_a_description_and_shows_highlighted_code(tmp_path_factory):
  exported = shared_export(tmp_path_factory)[1]
  tmp = tmp_path_factory.mktemp("playground")
  server = Server(exported, "--warmup", "", log_path=str(tmp / "server.log"))
  try:
    status, page, _ = request(server.url + "/")
    assert status == 200 and b'id="description"' in page
    description = "reverse a string"
    status, data, _ = request(server.url + "/v1/generate", {"descriptions": description})
    want = json.loads(data)["results"][0]["candidates"][0]["code"]
    snippet = "@cache\ndef f(x=1):\n  return 'a'  # c\n"
    query = urllib.parse.urlencode({"q": description, "strategy": "greedy", "auto": "1",
                                    "selftest": snippet})
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--no-default-browser-check", f"--user-data-dir={tmp / 'profile'}",
           "--virtual-time-budget=60000", "--dump-dom", f"{server.url}/?{query}"]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    dom = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0 and "</html>" in dom, proc.stderr.decode()[-2000:]
    assert 'data-state="done"' in dom, dom[-3000:]
    shown = _find(dom, "code-0")
    assert "".join(shown.text).split() == want.split() and want.strip()
    selftest = _find(dom, "selftest")
    assert "".join(selftest.text) == snippet
    assert {"dec", "kw", "def", "num", "str", "com"} <= set(selftest.classes)
  finally:
    server.stop()
