// MathJax 3 configuration for pymdownx.arithmatex (generic mode): arithmatex wraps every
// formula in an element of class "arithmatex" with \( \) or \[ \] delimiters, and MathJax
// typesets only those elements, once, when the page has loaded. MathJax itself is served from
// javascripts/mathjax/ (no CDN).
//
// The site does not use Material's instant navigation (navigation.instant), so every page is a
// full load and MathJax's own startup typesetting is enough. With instant navigation, the
// new content would have to be typeset on each document$ emission instead (without running
// concurrently with the startup pass, which leaves the glyphs' font rules out).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
