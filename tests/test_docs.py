"""The docs site: notebooks stored clean, executed once, built strictly, checked in headless Chromium.

The expensive chain (execute every tutorial, ``mkdocs build --strict``, open every page in
Chromium, measure pages at 400, 700 and 1200 px with ``tests/docs_layout_probe.js``) runs once per
test session, even under pytest-xdist: the first worker to take a lock
directory does it and writes the results to a folder shared by the workers; the others wait and
read them. Times, the page count and screenshots go to ``artifacts/``.

Set ``LORALAB_SKIP_BROWSER=1`` to skip the browser checks where Chromium cannot be installed.
"""

from __future__ import annotations

import contextlib
import functools
import html
import html.parser
import http.server
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
# a console line from the page: '[...:INFO:CONSOLE:12] "Uncaught TypeError: ...", source: http://...'
CONSOLE_LINE = re.compile(r":CONSOLE[:(]\d*\)?\]\s*(.*)$")

pytestmark = pytest.mark.docs


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


execute_notebooks = _load("loralab_execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
make_docs_figures = _load("loralab_make_docs_figures", ROOT / "scripts" / "make_docs_figures.py")
hooks = _load("loralab_docs_hooks", ROOT / "docs" / "hooks.py")


# ---------------------------------------------------------------- helpers -------------------------


class _Text(html.parser.HTMLParser):
    """Visible prose of an HTML document: no code, scripts, styles or typeset math."""

    SKIP = {"script", "style", "title", "pre", "code", "mjx-container", "svg", "math", "textarea"}

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


def prose(document: str) -> str:
    # mkdocs-jupyter keeps each code cell's source, as plain text, in a hidden div for its copy
    # button: code, not prose, even when a string in it holds "$...$" for matplotlib.
    document = re.sub(r'<div class="clipboard-copy-txt"[^>]*>.*?</div>', "", document, flags=re.S)
    parser = _Text()
    parser.feed(document)
    return "".join(parser.parts)


def has_tex(document: str) -> bool:
    """Whether the prose of a page holds TeX delimiters that MathJax should typeset."""
    text = prose(document)
    return bool(re.search(r"\$\$|\\\(|\\\[|\$[^$\s][^$\n]*?\$", text))


def chromium_available() -> bool:
    if Path(CHROMIUM).exists():
        return True
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            check=False,
            capture_output=True,
            timeout=600,
        )
    return Path(CHROMIUM).exists()


def open_page(url: str, *, screenshot: Path | None = None, width: int = 1280) -> dict:
    """Load ``url`` in headless Chromium; return the DOM after scripts ran and the console lines."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=8000",
        ]
        if screenshot is None:
            cmd += ["--dump-dom", url]
        else:
            cmd += [
                f"--screenshot={screenshot}",
                f"--window-size={width},1000",
                "--hide-scrollbars",
                url,
            ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [m.group(1) for line in proc.stderr.splitlines() if (m := CONSOLE_LINE.search(line))]
    return {"dom": proc.stdout, "console": console, "returncode": proc.returncode}


PROBE_SCRIPT = ROOT / "tests" / "docs_layout_probe.js"
# Window widths of the layout checks: a phone, a half-screen window beside a notebook, a laptop.
NARROW_WIDTHS = (400, 700)
WIDE_WIDTH = 1200
# Reverts the display-math fix in docs/stylesheets/extra.css: a page that must fail the checks.
PLANTED_MATH_PAGE = "guides/math/index.html#planted"
PLANTED_MATH_BUG = (
    "<style>.md-typeset mjx-container[jax=SVG] > svg { max-width: 100% !important; }</style>"
)


def has_display_math(document: str) -> bool:
    """Whether a built page holds display math: a Markdown ``$$`` block or one in a notebook."""
    return '<div class="arithmatex">' in document or bool(re.search(r"\$\$|\\\[", prose(document)))


def probe_layout(
    site: Path, base: str, frames: list[tuple[str, int]], name: str = "loralab-layout"
) -> dict:
    """Measure built pages at given window widths, in one Chromium run; ``{"page@width": ...}``.

    ``--dump-dom`` cannot measure layout and headless windows are at least 500 px wide, so each
    page is copied next to itself with ``tests/docs_layout_probe.js`` inlined, and the copies are
    opened in iframes of the wanted widths (an iframe is its page's viewport: media queries and
    Material's mobile layout follow its width) on one page whose script gathers what every probe
    measured into the DOM that ``--dump-dom`` returns.
    """
    script = "<script>" + PROBE_SCRIPT.read_text(encoding="utf-8") + "</script>"
    copies: dict[str, str] = {}
    for page, _ in frames:
        if page in copies:
            continue
        planted = page.endswith("#planted")
        source = site / page.removesuffix("#planted")
        copy = "loralab-probe-planted.html" if planted else "loralab-probe.html"
        text = source.read_text(encoding="utf-8")
        extra = PLANTED_MATH_BUG if planted else ""
        (source.parent / copy).write_text(
            text.replace("</body>", extra + script + "</body>"), encoding="utf-8"
        )
        copies[page] = (source.parent / copy).relative_to(site).as_posix()
    iframes = "\n".join(
        f'<iframe data-key="{html.escape(page)}@{width}" src="/{copies[page]}" '
        f'style="width:{width}px;height:900px;border:0"></iframe>'
        for page, width in frames
    )
    (site / f"{name}.html").write_text(
        f"""<!doctype html><html><body>{iframes}<script>
const frames = [...document.querySelectorAll("iframe")];
const found = {{}};
let polls = 0;
const el = document.createElement("script");
el.type = "application/json"; el.id = "loralab-layout";
document.body.appendChild(el);
const poll = () => {{  // what was found so far is in the DOM whenever Chromium dumps it
  for (const f of frames) {{
    const out = f.contentDocument && f.contentDocument.getElementById("loralab-probe");
    if (out) found[f.dataset.key] = JSON.parse(out.textContent);
  }}
  el.textContent = JSON.stringify(found).replaceAll("<", "\\\\u003c");
  if (Object.keys(found).length < frames.length && ++polls < 250) setTimeout(poll, 200);
}};
poll();
</script></body></html>""",
        encoding="utf-8",
    )
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=60000",
            "--window-size=1400,1000",
            "--dump-dom",
            f"{base}/{name}.html",
        ]
        try:
            dom = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
        except subprocess.TimeoutExpired:
            dom = ""  # every frame is then reported missing
    match = re.search(
        r'<script type="application/json" id="loralab-layout">(.*?)</script>', dom, re.S
    )
    found = json.loads(match.group(1)) if match else {}
    return {f"{page}@{width}": found.get(f"{page}@{width}") for page, width in frames}


@contextlib.contextmanager
def serve(directory: Path):
    """Serve ``directory`` on a free localhost port (search needs http://, not file://)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def image_outputs(nb_path: Path) -> int:
    """Number of image outputs (png, jpeg, svg) in an executed notebook."""
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    return sum(
        any(k.startswith("image/") for k in out.get("data", {}))
        for cell in nb["cells"]
        for out in cell.get("outputs", [])
    )


def rendered_figures(dom: str) -> tuple[int, int]:
    """(figures with data, img elements without a source) in a notebook page's DOM."""
    imgs = re.findall(r"<img\b[^>]*>", dom)
    empty = sum(not re.search(r'\bsrc="[^"]+"', tag) for tag in imgs)
    with_data = sum(bool(re.search(r'\bsrc="data:image/[^"]{100,}"', tag)) for tag in imgs)
    svgs = len(re.findall(r'class="[^"]*jp-RenderedSVG[^"]*"', dom))
    return with_data + svgs, empty


# ---------------------------------------------------------------- the chain, once ------------------


def _build_and_check(work: Path) -> dict:
    """Execute the notebooks, build the site strictly, open every page; record everything."""
    report: dict = {"notebooks": [], "build": None, "pages": {}, "errors": []}
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(msg)

    log("executing tutorials/ with nbclient:")
    # The kernels get a temporary folder of their own (TMPDIR), so that anything a tutorial
    # leaves there is seen; torch's compile cache, which importing peft creates, goes elsewhere.
    kernel_tmp = work / "kernel-tmp"
    kernel_tmp.mkdir()
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    os.environ["TMPDIR"] = str(kernel_tmp)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "torchinductor-cache")
    try:
        results = execute_notebooks.execute_all(log=lambda m: log("  " + m))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    report["left_in_tmp"] = sorted(p.name for p in kernel_tmp.iterdir())
    report["notebooks"] = [
        {
            "source": r.source.relative_to(ROOT).as_posix(),
            "executed": execute_notebooks.output_path(r.source).relative_to(ROOT).as_posix(),
            "seconds": r.seconds,
            "error": r.error,
        }
        for r in results
    ]

    # A fresh clone has no executed copies, and an edited notebook has a stale one: the build must
    # make both itself. Remove the copy of the quickest notebook and make the next one's stale.
    quickest = sorted((r for r in results if r.error is None), key=lambda r: r.seconds)[:2]
    for i, r in enumerate(quickest):
        dest = execute_notebooks.output_path(r.source)
        if i == 0:
            dest.unlink()
        else:
            nb = json.loads(dest.read_text(encoding="utf-8"))
            nb["metadata"][execute_notebooks.METADATA_KEY]["source_sha256"] = "stale"
            dest.write_text(json.dumps(nb), encoding="utf-8")
    report["rebuilt_by_hook"] = [r.source.relative_to(ROOT).as_posix() for r in quickest]

    site = work / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # no -q: with -q, mkdocs hides warnings from --strict's count and exits 0 (a mkdocs quirk)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - start
    pages = sorted(
        p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.name != "404.html"
    )
    report["build"] = {
        "returncode": proc.returncode,
        "seconds": seconds,
        "log": proc.stdout + proc.stderr,
        "site": str(site),
        "pages": pages,
    }
    log(f"mkdocs build --strict: {seconds:.1f} s, {len(pages)} pages, exit {proc.returncode}")
    if proc.returncode != 0:
        return _finish(report, lines)

    if os.environ.get("LORALAB_SKIP_BROWSER") == "1":
        report["browser"] = "skipped: LORALAB_SKIP_BROWSER=1"
        return _finish(report, lines)
    if not chromium_available():
        report["browser"] = (
            f"missing: {CHROMIUM} (apt-get install -y --no-install-recommends chromium)"
        )
        return _finish(report, lines)
    report["browser"] = "ok"

    # a throwaway page with a planted error proves that the console scan sees errors
    (site / "planted-error.html").write_text(
        "<html><body><p>planted</p><script>notAFunction();</script></body></html>", encoding="utf-8"
    )
    dom_dir = work / "dom"
    dom_dir.mkdir()
    ARTIFACTS.mkdir(exist_ok=True)
    start = time.perf_counter()
    with serve(site) as base:

        def visit(page: str) -> tuple[str, dict]:
            url = f"{base}/{page[: -len('index.html')] if page.endswith('index.html') else page}"
            return page, open_page(url)

        # API pages share one template: open two of them and every one that holds math
        api = [p for p in pages if p.startswith("api/")]
        api = api[:2] + [p for p in api[2:] if has_tex((site / p).read_text(encoding="utf-8"))]
        to_open = [p for p in pages if not p.startswith("api/")] + api + ["planted-error.html"]
        with ThreadPoolExecutor(max_workers=2) as pool:
            visited = list(pool.map(visit, to_open))
        tutorials = [p for p in pages if p.startswith("tutorials/") and p != "tutorials/index.html"]
        shots = {"home.png": f"{base}/"}
        if tutorials:
            shots["tutorial.png"] = f"{base}/{tutorials[0][: -len('index.html')]}"
        for name, url in shots.items():
            open_page(url, screenshot=ARTIFACTS / name)
        # Chromium's headless windows are 500 px wide at the least: the narrowest screenshot
        open_page(f"{base}/guides/math/", screenshot=ARTIFACTS / "math-500px.png", width=500)
        shots["math-500px.png"] = f"{base}/guides/math/"

        layout_start = time.perf_counter()
        # at narrow widths: every Markdown page with display math (Material's mobile layout of
        # `div.arithmatex` hid them) and the first two notebooks with display math; at 1200 px
        # every tutorial (figures and printed outputs), exercise notebooks left out for time
        with_math = [
            p
            for p in pages
            if not p.startswith("api/") and has_display_math((site / p).read_text("utf-8"))
        ]
        notebooks = [p for p in with_math if any((site / p).parent.glob("*.ipynb"))]
        with_math = [p for p in with_math if p not in notebooks] + notebooks[:2]
        narrow = [(p, w) for p in with_math + [PLANTED_MATH_PAGE] for w in NARROW_WIDTHS]
        wide = [(p, WIDE_WIDTH) for p in tutorials if not p.startswith("tutorials/exercises/")]
        with ThreadPoolExecutor(max_workers=2) as pool:
            probes = pool.map(
                lambda job: probe_layout(site, base, job[0], name=job[1]),
                [(narrow, "loralab-layout-narrow"), (wide, "loralab-layout-wide")],
            )
            report["layout"] = {k: v for found in probes for k, v in found.items()}
        log(
            f"layout probes: {len(narrow)} narrow and {len(wide)} wide frames in "
            f"{time.perf_counter() - layout_start:.1f} s"
        )
    for page, result in visited:
        dom_file = dom_dir / (page.replace("/", "__") + ".dom.html")
        dom_file.write_text(result["dom"], encoding="utf-8")
        static = (site / page).read_text(encoding="utf-8") if (site / page).exists() else ""
        report["pages"][page] = {
            "dom": str(dom_file),
            "console": result["console"],
            "returncode": result["returncode"],
            "has_tex": has_tex(static),
        }
    log(f"browser: {len(visited)} pages opened in {time.perf_counter() - start:.1f} s")
    log(f"screenshots: {', '.join(str(ARTIFACTS / n) for n in shots)}")
    return _finish(report, lines)


def _finish(report: dict, lines: list[str]) -> dict:
    total = sum(n["seconds"] for n in report["notebooks"])
    lines.append(f"notebooks: {len(report['notebooks'])} executed in {total:.1f} s in total")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "docs-report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


@pytest.fixture(scope="session")
def site_report(tmp_path_factory) -> dict:
    """The report of the chain; computed by one xdist worker, read by the others."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    lock, done = shared / "loralab-docs.lock", shared / "loralab-docs.json"
    try:
        lock.mkdir()
    except FileExistsError:
        deadline = time.monotonic() + 1800
        while not done.exists():
            if time.monotonic() > deadline:
                pytest.fail("timed out waiting for another worker to build the docs")
            time.sleep(0.5)
        return json.loads(done.read_text(encoding="utf-8"))
    work = shared / "loralab-docs"
    work.mkdir()
    try:
        report = _build_and_check(work)
    except Exception as exc:  # the waiting workers must see the failure too
        report = {"crash": f"{type(exc).__name__}: {exc}"}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(report), encoding="utf-8")
    os.replace(tmp, done)
    return report


@pytest.fixture(scope="session")
def built(site_report) -> dict:
    if "crash" in site_report:
        pytest.fail(f"the docs chain crashed: {site_report['crash']}")
    build = site_report["build"]
    if build["returncode"] != 0:
        problems = [line for line in build["log"].splitlines() if not line.startswith("INFO")]
        pytest.fail("mkdocs build --strict failed:\n" + "\n".join(problems)[-6000:])
    return site_report


@pytest.fixture(scope="session")
def browsed(built) -> dict:
    if built.get("browser") != "ok":
        if "skipped" in built.get("browser", ""):
            pytest.skip(built["browser"])
        pytest.fail(f"Chromium not available: {built.get('browser')}")
    return built


def _dom(report: dict, page: str) -> str:
    return Path(report["pages"][page]["dom"]).read_text(encoding="utf-8")


# ---------------------------------------------------------------- cheap checks ---------------------


@pytest.mark.parametrize(
    "nb_path",
    execute_notebooks.find_notebooks()
    or [pytest.param(None, marks=pytest.mark.skip("no notebooks"))],
    ids=lambda p: p.relative_to(ROOT).as_posix() if p else "none",
)
def test_notebook_is_stored_without_outputs(nb_path):
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{nb_path.name}: cells {dirty} carry outputs; strip them before committing"


TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("nb_path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_teaches_in_the_common_pattern(nb_path):
    """A predict-then-run question, a "What we learned" summary, a link to an exercise notebook;
    every relative link to a notebook or a docs page points at a file that exists."""
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    text = "\n".join(
        "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        for c in nb["cells"]
        if c["cell_type"] == "markdown"
    )
    assert re.search(r"predict,? then run", text, flags=re.I), "no predict-then-run question"
    assert "## What we learned" in text, "no 'What we learned' summary"
    exercises = re.findall(r"\]\((exercises/[^)#]+\.ipynb)\)", text)
    assert exercises, "no link to an exercise notebook"
    links = re.findall(r"\]\(([^)#\s]+\.(?:ipynb|md))(?:#[^)]*)?\)", text)
    missing = [link for link in links if not (nb_path.parent / link).resolve().is_file()]
    assert not missing, f"links to files that do not exist: {missing}"


def _write_notebook(path: Path, *sources: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.mark.notebook
def test_execute_script_runs_each_notebook_in_its_folder_with_this_python(tmp_path):
    src, out = tmp_path / "tutorials", tmp_path / "out"
    _write_notebook(
        src / "exercises" / "where.ipynb",
        "import os, sys\nprint(os.getcwd())\nprint(sys.prefix)",
    )
    (out / "gone.ipynb").parent.mkdir(parents=True)
    (out / "gone.ipynb").write_text("{}")  # an executed copy whose source was deleted
    results = execute_notebooks.execute_all(source_dir=src, output_dir=out, log=lambda m: None)
    assert [r.error for r in results] == [None]
    executed = json.loads((out / "exercises" / "where.ipynb").read_text())
    text = executed["cells"][0]["outputs"][0]["text"]
    cwd, prefix = ("".join(text) if isinstance(text, list) else text).splitlines()
    assert Path(cwd) == (src / "exercises").resolve()
    assert Path(prefix) == Path(sys.prefix)
    recorded = executed["metadata"]["loralab"]
    assert recorded["source_sha256"] == execute_notebooks.source_digest(
        src / "exercises" / "where.ipynb"
    )
    assert not (out / "gone.ipynb").exists()


@pytest.mark.notebook
def test_executed_notebooks_keep_their_figures_when_mplbackend_is_agg(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # what the test environment sets
    src, out = tmp_path / "tutorials", tmp_path / "out"
    _write_notebook(
        src / "plot.ipynb", "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"
    )
    results = execute_notebooks.execute_all(source_dir=src, output_dir=out, log=lambda m: None)
    assert [r.error for r in results] == [None]
    assert image_outputs(out / "plot.ipynb") == 1


@pytest.mark.notebook
def test_hook_executes_missing_and_stale_notebooks_and_reuses_current_ones(tmp_path, caplog):
    src, docs = tmp_path / "tutorials", tmp_path / "docs"
    _write_notebook(src / "a.ipynb", "print('first')")
    _write_notebook(src / "sub" / "b.ipynb", "print('b')")
    _write_notebook(src / "broken.ipynb", "raise ValueError('planted failure')")

    def output(rel):
        nb = json.loads((docs / "tutorials" / rel).read_text())
        text = nb["cells"][0]["outputs"][0]["text"]
        return "".join(text) if isinstance(text, list) else text

    with caplog.at_level("INFO", logger="mkdocs.hooks.loralab"):
        found = hooks._tutorials(docs, src)  # nothing executed yet: a fresh clone
    assert [t["uri"] for t in found] == ["tutorials/a.ipynb", "tutorials/sub/b.ipynb"]
    assert output("a.ipynb") == "first\n" and output("sub/b.ipynb") == "b\n"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "broken.ipynb failed to execute" in warnings[0]
    assert "planted failure" in warnings[0]
    assert not (docs / "tutorials" / "broken.ipynb").exists()

    b_copy = docs / "tutorials" / "sub" / "b.ipynb"
    b_before = b_copy.stat().st_mtime_ns
    _write_notebook(src / "a.ipynb", "print('second')")  # a.ipynb's copy is now stale
    caplog.clear()
    with caplog.at_level("INFO", logger="mkdocs.hooks.loralab"):
        hooks._tutorials(docs, src)
    assert output("a.ipynb") == "second\n"  # re-executed
    assert b_copy.stat().st_mtime_ns == b_before  # current: reused, not executed again
    executed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("executed ")]
    assert len(executed) == 1 and "a.ipynb" in executed[0]


@pytest.mark.notebook
def test_type_along_notebook_accepts_its_answers_and_uses_them(tmp_path):
    """05b runs with blank cells (stand-ins) in the docs; with its folded answers typed in, every
    check passes and the learner's own functions train the network."""
    import nbformat

    path = ROOT / "tutorials" / "05b_build_lora_yourself.ipynb"
    nb = nbformat.read(path, as_version=4)
    answers = next(
        re.search(r"```python\n(.*?)```", c.source, flags=re.S).group(1)
        for c in nb.cells
        if c.cell_type == "markdown" and "<summary>Answers" in c.source
    )
    forward, backward = re.split(r"\n(?=def my_backward)", answers.strip())
    blanks = {c.id: c for c in nb.cells if c.cell_type == "code"}
    assert "raise NotImplementedError" in blanks["blank_forward"].source
    assert "raise NotImplementedError" in blanks["blank_backward"].source
    blanks["blank_forward"].source, blanks["blank_backward"].source = forward, backward
    typed = tmp_path / "05b_typed.ipynb"
    nbformat.write(nb, typed)
    execute_notebooks.execute_notebook(typed, tmp_path / "out.ipynb")
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    printed = "".join(
        o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "step 1: your forward is used below" in printed
    assert "step 2: your backward is used below" in printed
    assert printed.count("Correct:") == 2


@pytest.mark.notebook
def test_execute_script_exits_1_and_names_the_failing_notebook(tmp_path, capsys):
    src, out = tmp_path / "tutorials", tmp_path / "out"
    _write_notebook(src / "good.ipynb", "x = 1")
    _write_notebook(src / "bad.ipynb", "raise ValueError('planted failure')")
    assert execute_notebooks.main(["--source", str(src), "--output", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "bad.ipynb  FAILED" in printed and "planted failure" in printed
    assert "total for 2 notebook(s), 1 failed" in printed
    assert (out / "good.ipynb").exists() and not (out / "bad.ipynb").exists()


def test_source_digest_ignores_outputs_but_not_sources(tmp_path):
    nb = tmp_path / "a.ipynb"
    _write_notebook(nb, "x = 1")
    before = execute_notebooks.source_digest(nb)
    data = json.loads(nb.read_text())
    data["cells"][0]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    nb.write_text(json.dumps(data))
    assert execute_notebooks.source_digest(nb) == before
    data["cells"][0]["source"] = "x = 2"
    nb.write_text(json.dumps(data))
    assert execute_notebooks.source_digest(nb) != before


def test_benchmarks_page_says_how_to_measure_when_results_are_missing(tmp_path):
    text = hooks.benchmark_results(tmp_path)
    assert "Not yet measured" in text and "loralab bench" in text


def test_benchmarks_page_inlines_results_and_every_figure(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "results.md").write_text(
        "| width | ratio |\n| --- | --- |\n| 256 | 1.02 |\n\n![overhead](overhead.svg)\n"
        "[raw](benchmarks/raw.json) [paper](https://arxiv.org/abs/2106.09685)\n"
    )
    for name in ("overhead.svg", "memory.png", "raw.json"):
        (bench / name).write_text("x")
    text = hooks.benchmark_results(tmp_path)
    assert "| 256 | 1.02 |" in text
    assert "](benchmarks/overhead.svg)" in text and text.count("overhead.svg") == 1
    assert "](benchmarks/memory.png)" in text  # a figure results.md does not show is appended
    assert "](benchmarks/raw.json)" in text and "](https://arxiv.org" in text


def test_notebook_title_is_the_first_heading(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("Intro\n\n# 2. Rank and *SVD*\n\ntext")]
    nbformat.write(nb, tmp_path / "02_rank.ipynb")
    assert hooks.notebook_title(tmp_path / "02_rank.ipynb") == "2. Rank and SVD"
    nb.cells = []
    nbformat.write(nb, tmp_path / "03_count.ipynb")
    assert hooks.notebook_title(tmp_path / "03_count.ipynb") == "03 count"


def test_home_page_example_is_the_readmes():
    """The home page shows the README's example (run by tests/test_readme.py), not a copy."""
    text = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert "```python" not in text and hooks.README_EXAMPLE_MARKER in text
    example = hooks.readme_example()
    assert example.startswith("```python\n") and "inject_lora" in example
    assert example in (ROOT / "README.md").read_text(encoding="utf-8")


def test_qlora_guide_numbers_are_the_ones_loralab_computes():
    """The QLoRA guide's bits per parameter, memory share and LLaMA 65B size, recomputed."""
    from loralab.quant import bits_per_parameter, quantized_bytes

    text = " ".join((ROOT / "docs" / "guides" / "qlora.md").read_text(encoding="utf-8").split())
    plain = bits_per_parameter("nf4")
    double = bits_per_parameter("nf4", double_quant=True)
    gb = quantized_bytes(65e9, "nf4", double_quant=True) / 1e9
    assert f"{plain:g} bits become {double:.3f}" in text  # "4.5 bits become 4.127"
    assert f"= {double:.3f} \\text{{ bits per parameter}}" in text
    assert f"${double:.3f}/32 = {double / 32:.3f}$ of its float32 memory" in text
    assert f"about {gb:.1f} GB, instead of {65e9 * 2 / 1e9:.0f} GB in 16-bit" in text


def test_math_guide_gpt3_count_is_the_one_loralab_params_computes():
    from loralab.counting import get_preset, lora_params_for_model

    text = (ROOT / "docs" / "guides" / "math.md").read_text(encoding="utf-8")
    shape = get_preset("gpt3-175b")
    count = lora_params_for_model(shape, 4, ["q", "v"])
    assert count == shape.n_layers * 2 * 4 * (shape.d_model + shape.d_model)
    stated = f"{shape.n_layers} \\times 2 \\times 4 \\times ({shape.d_model} + {shape.d_model})"
    assert f"{stated} = {count:,}".replace(",", "{,}") in text  # "... = 18{,}874{,}368"


def test_exercise_numbers_in_notebooks_and_instructors_guide_are_the_catalogues():
    """Exercise N is the N-th entry of `loralab.exercises.EXERCISES` (what `next_step` prints)."""
    from loralab.exercises._catalogue import EXERCISES

    numbered = {i: e.notebook for i, e in enumerate(EXERCISES.values(), start=1)}
    for notebook in sorted({e.notebook for e in EXERCISES.values()}):
        nb = json.loads((ROOT / "tutorials" / "exercises" / notebook).read_text(encoding="utf-8"))
        headings = "\n".join(
            line
            for cell in nb["cells"]
            if cell["cell_type"] == "markdown"
            for line in "".join(cell["source"]).splitlines()
            if line.startswith("#")
        )
        named = {int(n) for n in re.findall(r"^#+ Exercises? (\d+)", headings, flags=re.M)}
        named |= {int(n) for n in re.findall(r"^# Exercises \d+–(\d+)", headings, flags=re.M)}
        assert named == {i for i, nbk in numbered.items() if nbk == notebook}, notebook
    guide = (ROOT / "docs" / "guides" / "instructors.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| `([^`]+\.ipynb)` \|", guide, flags=re.M)
    assert {int(i): nbk for i, nbk in rows} == numbered


def test_home_page_lists_every_tutorial():
    tutorials = [
        {"uri": "tutorials/01_a.ipynb", "title": "1. First", "group": "."},
        {"uri": "tutorials/11_q.ipynb", "title": "11. QLoRA", "group": "."},
        {"uri": "tutorials/exercises/01_x.ipynb", "title": "Exercise", "group": "exercises"},
    ]
    listed = hooks.tutorial_list(tutorials)
    assert listed.splitlines() == [
        "- [1. First](tutorials/01_a.ipynb)",
        "- [11. QLoRA](tutorials/11_q.ipynb)",
    ]
    assert hooks.TUTORIAL_LIST_MARKER in (ROOT / "docs" / "index.md").read_text(encoding="utf-8")


def test_notebook_links_written_for_jupyter_are_mapped_to_site_files():
    src = "tutorials/06_fine_tuning_with_lora.ipynb"
    target = hooks.notebook_link_target
    assert target("exercises/04_merge.ipynb", src) == ("tutorials/exercises/04_merge.ipynb", "")
    assert target("05b_build.ipynb", src) == ("tutorials/05b_build.ipynb", "")
    assert target("../docs/guides/math.md#scaling", src) == ("guides/math.md", "scaling")
    assert target("../../index.md", "tutorials/exercises/01.ipynb") == ("index.md", "")
    for other in ("https://arxiv.org/abs/2106.09685", "#scaling", "/abs.md", "data.csv"):
        assert target(other, src) is None


def test_block_diagram_is_drawn_deterministically(tmp_path):
    pytest.importorskip("matplotlib")
    first = make_docs_figures.draw_block(tmp_path / "a").read_bytes()
    second = make_docs_figures.draw_block(tmp_path / "b").read_bytes()
    assert first == second and b"<svg" in first
    committed = ROOT / "docs" / "assets" / "figures" / make_docs_figures.BLOCK_FIGURE
    assert committed.is_file()
    assert "lora_block.svg" in (ROOT / "docs" / "index.md").read_text(encoding="utf-8")


def test_docs_figure_is_drawn_from_computed_data(tmp_path):
    pytest.importorskip("matplotlib")
    s_w0, s_dw = make_docs_figures.spectra(r=8)
    assert (s_dw[8:] < 1e-10 * s_dw[0]).all() and (s_dw[:8] > 1e-6 * s_dw[0]).all()
    assert (s_w0 > 1e-6 * s_w0[0]).all()
    path = make_docs_figures.draw(tmp_path)
    assert "<svg" in path.read_text(encoding="utf-8")
    assert (ROOT / "docs" / "assets" / "figures" / make_docs_figures.FIGURE).is_file()


# ---------------------------------------------------------------- the built site -------------------


@pytest.mark.notebook
def test_every_tutorial_executes_without_error(site_report):
    if "crash" in site_report:
        pytest.fail(site_report["crash"])
    failed = [f"{n['source']}: {n['error']}" for n in site_report["notebooks"] if n["error"]]
    assert not failed, "\n".join(failed)


@pytest.mark.notebook
def test_tutorials_leave_nothing_in_the_temporary_folder(site_report):
    if "crash" in site_report:
        pytest.fail(site_report["crash"])
    left = site_report["left_in_tmp"]
    assert left == [], (
        f"the tutorials left {left} in their TMPDIR: use tempfile.TemporaryDirectory()"
    )


def test_site_builds_strictly_with_every_tutorial_in_the_nav(built):
    pages = built["build"]["pages"]
    for nb in built["notebooks"]:
        page = Path(nb["executed"]).relative_to("docs").with_suffix("").as_posix() + "/index.html"
        assert page in pages, f"{nb['source']} has no page in the site"
        site_nb = Path(built["build"]["site"]) / Path(page).parent / Path(nb["executed"]).name
        assert site_nb.is_file(), f"no downloadable notebook next to {page}"
    assert "index.html" in pages and "api/index.html" in pages


def test_strict_build_executes_missing_and_stale_notebooks_itself(built):
    log = built["build"]["log"]
    assert len(built["rebuilt_by_hook"]) == 2
    for source in built["rebuilt_by_hook"]:
        src = ROOT / source
        assert f"executed {source}" in log, f"the build did not execute {source}"
        dest = execute_notebooks.output_path(src)
        recorded = json.loads(dest.read_text(encoding="utf-8"))["metadata"]["loralab"]
        assert recorded["source_sha256"] == execute_notebooks.source_digest(src)


def test_tutorial_pages_link_to_site_pages_not_to_notebook_files(built):
    site = Path(built["build"]["site"])
    stale = {}
    for page in built["build"]["pages"]:
        if not page.startswith("tutorials/") or page == "tutorials/index.html":
            continue
        text = (site / page).read_text(encoding="utf-8")
        # every link but the download button (which fetches the notebook file itself)
        hrefs = re.findall(r'<a (?![^>]*\bdownload\b)[^>]*href="([^"]+)"', text)
        bad = [
            h for h in hrefs if hooks.notebook_link_target(html.unescape(h), "tutorials/x.ipynb")
        ]
        if bad:
            stale[page] = bad[:3]
    assert not stale, stale


def test_search_index_exists(built):
    index = Path(built["build"]["site"]) / "search" / "search_index.json"
    docs = json.loads(index.read_text(encoding="utf-8"))["docs"]
    assert len(docs) > len(built["build"]["pages"])
    assert any("LoRA" in d["text"] for d in docs)


def test_site_loads_nothing_from_other_hosts(built):
    site = Path(built["build"]["site"])
    remote = re.compile(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"')
    offenders = {
        p.relative_to(site).as_posix(): remote.findall(p.read_text(encoding="utf-8"))[:3]
        for p in site.rglob("*.html")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders
    assert (site / "assets" / "mathjax" / "tex-svg.js").is_file()


def test_api_reference_covers_every_public_name(built):
    site = Path(built["build"]["site"])
    missing = []
    modules = [n for n, _ in hooks.api_pages()]
    for name in (n for n, _ in hooks.API_MODULES if hooks.module_exists(n)):
        # a re-exported name is documented once, on its module's page
        pages = [site / "api" / name / "index.html"]
        pages += sorted((site / "api").glob(f"{name}.*/index.html"))
        page = "".join(p.read_text(encoding="utf-8") for p in pages)
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None)
        if public is None:
            public = [
                n
                for n, obj in vars(module).items()
                if not n.startswith("_") and getattr(obj, "__module__", None) == name
            ]
        for member in public:
            if member.startswith("_") or inspect.ismodule(getattr(module, member, None)):
                continue  # submodules have their own pages
            where = hooks.documented_at(name, member, modules)
            if where != name and not where.startswith(f"{name}."):
                page += (site / "api" / where / "index.html").read_text(encoding="utf-8")
            if not re.search(
                rf'id="({re.escape(name)}|{re.escape(where)})(\.\w+)*\.{member}"', page
            ):
                missing.append(f"{name}.{member}")
    assert not missing, f"not in the API reference: {missing}"


def test_browser_console_scan_catches_a_planted_error(browsed):
    console = browsed["pages"]["planted-error.html"]["console"]
    assert any("Uncaught ReferenceError" in line for line in console), console


def test_no_page_logs_a_javascript_error(browsed):
    noisy = {
        page: info["console"]
        for page, info in browsed["pages"].items()
        if page != "planted-error.html" and info["console"]
    }
    assert not noisy, noisy


def test_math_is_typeset_on_every_page_with_math(browsed):
    with_math = [p for p, info in browsed["pages"].items() if info["has_tex"]]
    assert "guides/math/index.html" in with_math and "index.html" in with_math
    problems = []
    for page in with_math:
        dom = _dom(browsed, page)
        if "<mjx-container" not in dom:
            problems.append(f"{page}: no MathJax output")
        text = prose(dom)
        raw = re.search(r"\$\$|\\\(|\\\[|\$[^$\s][^$\n]*?\$", text)
        if raw:
            at = raw.start()
            problems.append(f"{page}: raw TeX left in text: ...{text[at - 40 : at + 40]!r}")
    assert not problems, "\n".join(problems)


def test_every_tutorial_page_shows_its_figures(browsed):
    problems = []
    for nb in browsed["notebooks"]:
        page = Path(nb["executed"]).relative_to("docs").with_suffix("").as_posix() + "/index.html"
        expected = image_outputs(ROOT / nb["executed"])
        shown, empty = rendered_figures(_dom(browsed, page))
        if shown < expected or empty:
            problems.append(
                f"{page}: {expected} figures in the notebook, {shown} shown, {empty} empty"
            )
    assert not problems, "\n".join(problems)


def test_screenshots_saved(browsed):
    assert (ARTIFACTS / "home.png").stat().st_size > 10_000
    if any(p.startswith("tutorials/") and p != "tutorials/index.html" for p in browsed["pages"]):
        assert (ARTIFACTS / "tutorial.png").stat().st_size > 10_000


def _layout(report: dict, widths) -> dict[str, dict]:
    """The layout probes at ``widths`` (page@width -> measures), the planted page left out."""
    found = {}
    for key, measured in report["layout"].items():
        page, _, width = key.rpartition("@")
        if page != PLANTED_MATH_PAGE and int(width) in widths:
            found[key] = measured
    return found


def _hidden_equations(measured: dict) -> list[int]:
    return [
        i
        for i, m in enumerate(measured["math"])
        if not (m["visible"] and m["svg"] and m["svg"]["visible"] and m["svg"]["width"] > 4)
    ]


def test_display_math_is_typeset_and_visible_at_narrow_widths(browsed):
    """At 400 and 700 px (a phone, a half-screen window) every display equation is typeset and
    drawn wider than zero: Material's mobile layout once shrank their SVGs to 1 px."""
    problems, checked = [], set()
    for key, measured in _layout(browsed, NARROW_WIDTHS).items():
        if measured is None:
            problems.append(f"{key}: the layout probe did not report")
            continue
        page, _, width = key.rpartition("@")
        assert measured["viewport"] == int(width), key
        checked.add(page)
        if measured["untypeset"]:
            problems.append(f"{key}: {measured['untypeset']} display equations not typeset")
        if not measured["math"]:
            problems.append(f"{key}: no typeset display equation found")
        if hidden := _hidden_equations(measured):
            problems.append(f"{key}: display equations {hidden} are invisible or 0 px wide")
    assert {"index.html", "guides/math/index.html"} <= checked
    assert not problems, "\n".join(problems)


def test_layout_probe_sees_vanishing_math_on_a_planted_page(browsed):
    """The math guide with the display-math fix reverted: every equation must be reported."""
    for width in NARROW_WIDTHS:
        measured = browsed["layout"][f"{PLANTED_MATH_PAGE}@{width}"]
        assert measured and measured["math"], width
        assert len(_hidden_equations(measured)) == len(measured["math"]), width


def test_printed_outputs_are_not_wrapped(browsed):
    """A printed line stays one line (it scrolls sideways): never broken inside a number."""
    wrapped = {
        key: [o["text"][:80] for o in measured["outputs"]]
        for key, measured in _layout(browsed, (*NARROW_WIDTHS, WIDE_WIDTH)).items()
        if measured and measured["outputs"]
    }
    assert not wrapped, wrapped


def test_notebook_figures_use_the_width_of_the_page(browsed):
    """At a 1200 px window a figure drawn 600 px wide or more is shown at least 600 px wide, and
    a smaller one at its own size."""
    problems = []
    for key, measured in _layout(browsed, (WIDE_WIDTH,)).items():
        assert measured is not None, f"{key}: the layout probe did not report"
        for i, fig in enumerate(measured["figures"]):
            least = min(600, fig["natural"]) - 1
            if not fig["visible"] or fig["width"] < least:
                problems.append(
                    f"{key}: figure {i} drawn {fig['natural']} px wide, shown {fig['width']:.0f}"
                )
    assert not problems, "\n".join(problems)


def test_notebook_tables_of_contents_keep_code_in_headings(built):
    """Each entry of a notebook page's table of contents reads as its heading, inline code
    included, and points at the heading's id (mkdocs-jupyter's dropped the code)."""
    site = Path(built["build"]["site"])
    problems = []
    for page in built["build"]["pages"]:
        if not any((site / page).parent.glob("*.ipynb")):
            continue  # not a notebook's page
        text = (site / page).read_text(encoding="utf-8")
        article = text[text.index('<article class="md-content__inner') :]
        headings = {
            anchor: " ".join(
                re.sub(r"<[^>]+>", "", inner.split('<a class="anchor-link"')[0]).split()
            )
            for anchor, inner in re.findall(
                r'<h[1-6] id="([^"]+)"[^>]*>(.*?)</h[1-6]>', article, re.S
            )
        }
        toc = text[text.index('<nav class="md-nav md-nav--secondary"') : text.index("<article")]
        entries = re.findall(
            r'<a href="#([^"]+)" class="md-nav__link">\s*<span class="md-ellipsis">\s*(.*?)\s*</span>',
            toc,
            re.S,
        )
        assert entries or not headings, f"{page}: no table of contents"
        for anchor, title in entries:
            title = " ".join(title.split())
            if anchor not in headings:
                problems.append(f"{page}: TOC entry {title!r} points at #{anchor}, no such heading")
            elif title != headings[anchor]:
                problems.append(f"{page}: TOC reads {title!r}, the heading {headings[anchor]!r}")
    assert not problems, "\n".join(problems[:20])


def test_home_page_shows_the_readme_example_and_a_headed_table(built):
    site = Path(built["build"]["site"])
    page = (site / "index.html").read_text(encoding="utf-8")
    code = html.unescape(re.sub(r"<[^>]+>", "", page))
    for line in hooks.readme_example().splitlines()[1:-1]:
        assert line.strip() in code, line
    headers = re.findall(r"<thead>(.*?)</thead>", page, re.S)
    assert headers and all(re.sub(r"<[^>]+>|\s", "", h) for h in headers), "a table has no header"


def test_exercises_index_lists_every_exercise_by_number(built):
    """`tutorials/exercises/` has a page: every exercise of the catalogue, numbered, linked."""
    from loralab.exercises._catalogue import EXERCISES

    site = Path(built["build"]["site"])
    page = (site / "tutorials" / "exercises" / "index.html").read_text(encoding="utf-8")
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())
    for number, exercise in enumerate(EXERCISES.values(), start=1):
        first = exercise.title.split(" and ")[0]
        assert f"{number}. {first}" in text, (number, exercise.title)
        link = f'href="../../tutorials/exercises/{Path(exercise.notebook).stem}/"'
        assert link in page or f'href="{Path(exercise.notebook).stem}/"' in page, exercise.notebook


def test_lora_api_page_leads_with_what_a_student_calls(built):
    site = Path(built["build"]["site"])
    page = (site / "api" / "loralab.lora" / "index.html").read_text(encoding="utf-8")
    documented = re.findall(r'<h[1-6] id="(loralab\.lora\.\w+)"', page)
    assert documented[0] in ("loralab.lora.LoraConfig", "loralab.lora.inject_lora"), documented[:3]
    assert documented.index("loralab.lora.inject_lora") < 3


def test_no_api_page_is_too_big(built):
    site = Path(built["build"]["site"])
    sizes = {p.parent.name: p.stat().st_size for p in (site / "api").glob("*/index.html")}
    assert len(sizes) > 20
    big = {name: size for name, size in sizes.items() if size > 300_000}
    assert not big, f"API pages over 300 KB (split them in docs/hooks.py): {big}"


def test_notebook_figure_text_is_readable_on_the_page(browsed):
    """At a 1200 px window, a figure's tick labels (drawn at FONT_SIZE points and FIGURE_DPI by
    scripts/execute_notebooks.py, then scaled to the shown width) are 9 px high or more."""
    scale = execute_notebooks.FONT_SIZE * execute_notebooks.FIGURE_DPI / 72
    small = [
        f"{key}: figure {i}, {fig['natural']} px drawn, {fig['width']:.0f} shown: tick labels "
        f"{scale * fig['width'] / fig['natural']:.1f} px (draw it narrower, or in two rows)"
        for key, measured in _layout(browsed, (WIDE_WIDTH,)).items()
        for i, fig in enumerate(measured["figures"])
        if fig["natural"] and scale * fig["width"] / fig["natural"] < 9
    ]
    assert not small, "\n".join(small)


@pytest.mark.notebook
def test_executed_notebooks_draw_figures_with_the_site_defaults(tmp_path):
    src, out = tmp_path / "tutorials", tmp_path / "out"
    _write_notebook(
        src / "rc.ipynb",
        "import matplotlib as mpl\nprint(mpl.rcParams['font.size'], mpl.rcParams['figure.dpi'])",
    )
    results = execute_notebooks.execute_all(source_dir=src, output_dir=out, log=lambda m: None)
    assert [r.error for r in results] == [None]
    printed = json.loads((out / "rc.ipynb").read_text())["cells"][0]["outputs"][0]["text"]
    expected = f"{float(execute_notebooks.FONT_SIZE)} {float(execute_notebooks.FIGURE_DPI)}"
    assert "".join(printed).strip() == expected


def test_hook_can_reuse_stale_copies_without_executing(tmp_path, monkeypatch):
    """LORALAB_DOCS_REUSE_STALE=1: a stale executed copy is used as it is, a missing one is left
    out, and nothing is executed."""
    src, docs = tmp_path / "tutorials", tmp_path / "docs"
    _write_notebook(src / "stale.ipynb", "print('new')")
    _write_notebook(src / "missing.ipynb", "print('x')")
    copy = docs / "tutorials" / "stale.ipynb"
    _write_notebook(copy, "print('old')")
    nb = json.loads(copy.read_text())
    nb["metadata"]["loralab"] = {"source_sha256": "older", "execution_seconds": 1.0}
    copy.write_text(json.dumps(nb))
    monkeypatch.setenv(hooks.REUSE_STALE, "1")
    ran = []
    monkeypatch.setattr(execute_notebooks, "execute_notebook", lambda *a, **k: ran.append(a))
    found = hooks._tutorials(docs, src)
    assert [t["uri"] for t in found] == ["tutorials/stale.ipynb"] and not ran
    assert "print('old')" in copy.read_text()
