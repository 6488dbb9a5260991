// Model output → safe HTML. marked parses the Markdown, highlight.js colours code, KaTeX typesets
// math, and DOMPurify sanitises the whole result last, so that nothing the model writes (nor
// anything highlight.js or KaTeX make of it) can run script in the page.

import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import css from "highlight.js/lib/languages/css";
import diff from "highlight.js/lib/languages/diff";
import go from "highlight.js/lib/languages/go";
import java from "highlight.js/lib/languages/java";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import markdown from "highlight.js/lib/languages/markdown";
import plaintext from "highlight.js/lib/languages/plaintext";
import python from "highlight.js/lib/languages/python";
import rust from "highlight.js/lib/languages/rust";
import shell from "highlight.js/lib/languages/shell";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";
import { Marked } from "marked";
import { markedHighlight } from "marked-highlight";
import markedKatex from "marked-katex-extension";

const languages = {
  bash, c, cpp, css, diff, go, java, javascript, json, markdown, plaintext, python, rust, shell,
  sql, typescript, xml, yaml,
};
for (const [name, def] of Object.entries(languages)) hljs.registerLanguage(name, def);

const HTML_ESCAPES: Record<string, string> = {
  "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
};
const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (ch) => HTML_ESCAPES[ch]);

const marked = new Marked(
  markedHighlight({
    emptyLangClass: "hljs",
    langPrefix: "hljs language-",
    highlight(code, lang) {
      const language = hljs.getLanguage(lang) ? lang : "plaintext";
      return hljs.highlight(code, { language, ignoreIllegals: true }).value;
    },
  }),
  markedKatex({ throwOnError: false, output: "htmlAndMathml" }),
  {
    gfm: true,
    breaks: true,
    // Raw HTML in a reply is shown as the text it is, as chat pages do, not interpreted.
    renderer: { html: ({ text }) => escapeHtml(text) },
  },
);

// Links open in a new tab without handing the page to the target.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const PURIFY = {
  USE_PROFILES: { html: true, mathMl: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
  ADD_ATTR: ["target"],
};

// Many models write math as \( … \) and \[ … \] (LaTeX's delimiters), which Markdown would read
// as escaped brackets. Outside code they become the $ … $ and $$ … $$ that KaTeX typesets.
const CODE_OR_MATH = /(```[\s\S]*?(?:```|$)|`[^`\n]*`)|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)/g;

export function latexDelimitersToDollars(text: string): string {
  return text.replace(CODE_OR_MATH, (_match, code, display, inline) => {
    if (code !== undefined) return code;
    if (display !== undefined) return `\n$$\n${display.trim()}\n$$\n`;
    return `$${inline.trim()}$`;
  });
}

export function renderMarkdown(text: string): string {
  const html = marked.parse(latexDelimitersToDollars(text), { async: false });
  return DOMPurify.sanitize(html, PURIFY);
}
