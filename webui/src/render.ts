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
import katex from "katex";
import { Marked, type MarkedExtension, type Token, type TokenizerAndRendererExtension } from "marked";
import { markedHighlight } from "marked-highlight";
import markedKatex from "marked-katex-extension";

const languages = {
  bash, c, cpp, css, diff, go, java, javascript, json, markdown, plaintext, python, rust, shell,
  sql, typescript, xml, yaml,
};
for (const [name, def] of Object.entries(languages)) hljs.registerLanguage(name, def);

// strict "ignore": what KaTeX only warns of (\htmlData without trust, which stays off) does not
// reach the console.
const KATEX = { throwOnError: false, output: "htmlAndMathml", strict: "ignore" } as const;

// Inline math: $…$ (or $$…$$ in a line) whose text holds no unescaped $ and starts and ends
// with no space, with no ASCII letter or digit just outside it (CJK text may touch it: 设$x$为).
// Prices stay text: in "costs $5 and $x$" only x is math (the extension's own rule read
// "5 and $x" as math, an error), and "花了$5和$3元" is all text.
const INLINE_MATH = /^(\${1,2})(?!\$)((?:\\.|[^\\\n$\s])(?:(?:\\.|[^\\\n$])*?(?:\\.|[^\\\n$\s]))?)\1(?![A-Za-z0-9$])/;

const inlineMath: TokenizerAndRendererExtension = {
  name: "inlineMath",
  level: "inline",
  start(src: string) {
    // A $ where math can begin: not right after an ASCII letter, digit or backslash (US$5).
    for (let i = src.indexOf("$"); i >= 0; i = src.indexOf("$", i + 1)) {
      if ((i === 0 || !/[A-Za-z0-9\\]/.test(src[i - 1])) && INLINE_MATH.test(src.slice(i))) return i;
    }
    return undefined;
  },
  tokenizer(src: string) {
    const m = INLINE_MATH.exec(src);
    if (m) return { type: "inlineMath", raw: m[0], text: m[2], displayMode: m[1].length === 2 };
    return undefined;
  },
  renderer: (token) => katex.renderToString(token.text, { ...KATEX, displayMode: token.displayMode }),
};

// Display math ($$ on lines of their own) from the extension; inline math by the rule above.
function mathExtension(): MarkedExtension {
  const ext = markedKatex(KATEX);
  ext.extensions = [...(ext.extensions ?? []).filter((e) => e.name !== "inlineKatex"), inlineMath];
  return ext;
}

const HTML_ESCAPES: Record<string, string> = {
  "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
};
const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (ch) => HTML_ESCAPES[ch]);

/** The tokens inside a link, at any depth, with each image as its alt text. */
function imagesAsText(tokens: Token[]): Token[] {
  return tokens.map((t) => {
    if (t.type === "image") {
      const alt = t.tokens?.length ? t.tokens : undefined;
      return { type: "text", raw: t.raw, text: t.text || t.href, ...(alt ? { tokens: alt } : {}) } as Token;
    }
    if ("tokens" in t && Array.isArray(t.tokens)) t.tokens = imagesAsText(t.tokens);
    return t;
  });
}

const marked = new Marked(
  markedHighlight({
    emptyLangClass: "hljs",
    langPrefix: "hljs language-",
    highlight(code, lang) {
      const language = hljs.getLanguage(lang) ? lang : "plaintext";
      return hljs.highlight(code, { language, ignoreIllegals: true }).value;
    },
  }),
  mathExtension(),
  {
    gfm: true,
    breaks: true,
    // An image inside a link (a badge) is its alt text: the link goes where it says, with no
    // link of the image's own nested in it.
    walkTokens(token) {
      if (token.type === "link" && token.tokens) token.tokens = imagesAsText(token.tokens);
    },
    renderer: {
      // Raw HTML in a reply is shown as the text it is, as chat pages do, not interpreted.
      html: ({ text }) => escapeHtml(text),
      // An image is a link to it: the page loads no image from elsewhere (its CSP would refuse
      // it and leave a broken icon), and a reply cannot make the browser fetch an address.
      image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
    },
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
// as escaped brackets. Outside code they become the $ … $ and $$ … $$ that KaTeX typesets. A
// display block ($$ lines, or \[ … \]) gets a blank line before it: right after a line of text
// Markdown would read it as more of that paragraph, and show the $$ (and eat its \, escapes).
// Code is a fence of 3 or more ` or ~ (to its like), or a `span`: kept as written.
const CODE_OR_MATH =
  /((`{3,}|~{3,})[\s\S]*?(?:\2|$)|``[^\n]*?``|`[^`\n]*`)|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|(^|\n)([ \t]*)\$\$[ \t]*\n([\s\S]*?)\n[ \t]*\$\$[ \t]*(?=\n|$)/g;

export function latexDelimitersToDollars(text: string): string {
  return text.replace(
    CODE_OR_MATH,
    (match, code, _fence, display, inline, lead, indent, block) => {
      if (code !== undefined) return code;
      if (display !== undefined) return `\n\n$$\n${display.trim()}\n$$\n\n`;
      if (inline !== undefined) return `$${inline.trim()}$`;
      // Indented 4 or more, the lines are a code block; less, they may belong to a list item,
      // so they keep their indent.
      if (indent.replace(/\t/g, "    ").length >= 4) return match;
      return `${lead}\n${indent}$$\n${block}\n${indent}$$\n`;
    },
  );
}

export function renderMarkdown(text: string): string {
  try {
    const html = marked.parse(latexDelimitersToDollars(text), { async: false });
    return DOMPurify.sanitize(html, PURIFY);
  } catch {
    // A reply nested past what the parsers' recursion takes (thousands of ">" or \frac{…}) is
    // shown as its text: one message that cannot be rendered must not break the page.
    return `<p class="unrendered">${escapeHtml(text).replace(/\n/g, "<br>")}</p>`;
  }
}
