// Injected by tests/test_docs.py into copies of built pages: once MathJax has typeset the page,
// measure what a reader sees and write it, as JSON, into <script id="loralab-probe">.
// --dump-dom cannot measure layout; this script can, and the dumped DOM carries its answer.
(() => {
  const box = (el) => {
    const r = el.getBoundingClientRect();
    const s = getComputedStyle(el);
    const shown = s.visibility !== "hidden" && s.display !== "none" && Number(s.opacity) > 0;
    return { width: r.width, height: r.height, visible: shown && r.width > 0 && r.height > 0 };
  };
  // Lines a <pre> shows: distinct tops of its text's line boxes, against the lines its text has.
  const renderedLines = (pre) => {
    const range = document.createRange();
    range.selectNodeContents(pre);
    const tops = new Set();
    for (const rect of range.getClientRects()) {
      if (rect.width > 0) tops.add(Math.round(rect.top));
    }
    return tops.size;
  };
  const measure = () => {
    const result = { viewport: window.innerWidth, math: [], untypeset: 0, figures: [], outputs: [] };
    for (const c of document.querySelectorAll("mjx-container[display]")) {
      const svg = c.querySelector("svg");
      result.math.push({ ...box(c), svg: svg ? box(svg) : null });
    }
    for (const div of document.querySelectorAll("div.arithmatex")) {
      if (!div.querySelector("mjx-container[display]")) result.untypeset += 1;
    }
    for (const img of document.querySelectorAll(".jp-RenderedImage img, .jp-RenderedSVG svg")) {
      const natural = img.naturalWidth || Number(img.getAttribute("width")) || 0;
      result.figures.push({ ...box(img), natural });
    }
    for (const pre of document.querySelectorAll(".jp-OutputArea-output pre")) {
      const text = pre.textContent.replace(/\n+$/, "");
      if (!text) continue;
      const lines = text.split("\n").length;
      const shown = renderedLines(pre);
      if (shown > lines) result.outputs.push({ lines, shown, text: text.slice(0, 200) });
    }
    const out = document.createElement("script");
    out.type = "application/json";
    out.id = "loralab-probe";
    out.textContent = JSON.stringify(result).replaceAll("<", "\\u003c");
    document.body.appendChild(out);
  };
  window.addEventListener("load", () => {
    const ready = window.MathJax && MathJax.startup ? MathJax.startup.promise : Promise.resolve();
    ready.then(measure, measure);
  });
})();
