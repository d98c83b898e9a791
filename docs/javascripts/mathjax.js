// MathJax 3 configuration for the loralab docs (loaded before assets/mathjax/tex-svg.js).
// Material's usual recipe ignores every classed element except `.arithmatex`; notebook markdown
// rendered by mkdocs-jupyter sits in `.jp-RenderedMarkdown`, so that class is processed too, and so
// is `.md-ellipsis`, the text of navigation and table-of-contents links (headings with math).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".+",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown|md-ellipsis",
  },
};

// Material's instant navigation swaps page content without a reload: typeset again each time.
document$.subscribe(() => {
  if (!window.MathJax.typesetPromise) {
    return; // first page load: MathJax typesets by itself when it starts
  }
  const output = MathJax.startup.output;
  if (output && typeof output.clearCache === "function") {
    output.clearCache();
  }
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
