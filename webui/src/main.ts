// The chat page: conversations on the left, the current one on the right, a composer below.
// Replies stream from the server that served the page; everything is kept in localStorage.

import "katex/dist/katex.min.css";
import "./style.css";

import { AuthError, type ChatMessage, ConnectionError, listModels, streamChat } from "./api";
import { lang, type Strings, t } from "./i18n";
import { renderMarkdown } from "./render";
import {
  CONVERSATIONS,
  HEARTBEAT_MS,
  type Conversation,
  importConversation,
  loadApiKey,
  loadConversations,
  loadCurrentId,
  loadSettings,
  markDeleted,
  markStreaming,
  mergeConversations,
  type Message,
  newConversation,
  othersSaved,
  saveApiKey,
  saveConversations,
  saveCurrentId,
  saveSettings,
  streamingElsewhere,
  toMarkdown,
  validApiKey,
} from "./store";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

const ui = {
  sidebar: $<HTMLElement>("sidebar"),
  main: document.querySelector("main") as HTMLElement,
  backdrop: $<HTMLElement>("backdrop"),
  newChat: $<HTMLButtonElement>("new-chat"),
  convList: $<HTMLUListElement>("conv-list"),
  importFile: $<HTMLInputElement>("import-file"),
  menuToggle: $<HTMLButtonElement>("menu-toggle"),
  title: $<HTMLHeadingElement>("conv-title"),
  model: $<HTMLSelectElement>("model"),
  settingsToggle: $<HTMLButtonElement>("settings-toggle"),
  settings: $<HTMLElement>("settings"),
  system: $<HTMLTextAreaElement>("system"),
  temperature: $<HTMLInputElement>("temperature"),
  topP: $<HTMLInputElement>("top-p"),
  maxTokens: $<HTMLInputElement>("max-tokens"),
  setKey: $<HTMLButtonElement>("set-key"),
  notice: $<HTMLElement>("notice"),
  messages: $<HTMLElement>("messages"),
  composer: $<HTMLFormElement>("composer"),
  input: $<HTMLTextAreaElement>("input"),
  send: $<HTMLButtonElement>("send"),
  keyDialog: $<HTMLDialogElement>("key-dialog"),
  keyForm: $<HTMLFormElement>("key-form"),
  keyWrong: $<HTMLElement>("key-wrong"),
  keyInput: $<HTMLInputElement>("key-input"),
  keyCancel: $<HTMLButtonElement>("key-cancel"),
};

let conversations = mergeConversations([], loadConversations());
let current: Conversation = pickCurrent();
const settings = loadSettings();
let apiKey = loadApiKey();
let controller: AbortController | null = null;
let streamingEl: HTMLElement | null = null;
// The reply being streamed and its conversation (always the current one while it streams).
let streaming: { conv: Conversation; reply: Message } | null = null;
let renderQueued = false;
let lastRenderEnd = 0; // when the streaming reply was last rendered (performance.now)
let lastRenderCost = 0; // and how long that took, ms
// A conversation whose reply was refused for want of a key: resent once a key is entered.
let resendAfterKey: Conversation | null = null;
let leaving = false; // the page is being unloaded (a reload, a link): a cut stream is no error
let sentAt = 0; // when the last reply was asked for (performance.now)

function pickCurrent(): Conversation {
  const id = loadCurrentId();
  const found = conversations.find((c) => c.id === id) ?? conversations[0];
  if (found) return found;
  const c = newConversation(t.untitled);
  conversations.unshift(c);
  return c;
}

/** Saves `changed` (by default the current conversation) with the rest. Other tabs of the page
 * may have saved theirs since: both are kept, and the current one is always this page's. */
function persist(changed: Conversation = current): void {
  changed.updated = Date.now();
  // Read back only when another tab saved since: this runs on each keystroke of the system prompt.
  if (othersSaved()) conversations = mergeConversations(conversations, loadConversations(), current);
  try {
    saveConversations(conversations);
    saveCurrentId(current.id);
  } catch {
    // The browser's storage is full: the chat goes on, but say that history is not kept.
    showNotice(t.storageFull);
  }
}

// ---- static text -------------------------------------------------------------------------

function applyStrings(): void {
  document.documentElement.lang = lang;
  document.title = t.title;
  for (const el of document.querySelectorAll<HTMLElement>("[data-t]")) {
    el.textContent = t[el.dataset.t as keyof Strings];
  }
  for (const el of document.querySelectorAll<HTMLElement>("[data-t-placeholder]")) {
    el.setAttribute("placeholder", t[el.dataset.tPlaceholder as keyof Strings]);
  }
  for (const el of document.querySelectorAll<HTMLElement>("[data-t-label]")) {
    const text = t[el.dataset.tLabel as keyof Strings];
    el.setAttribute("aria-label", text);
    el.title = text;
  }
}

// ---- small DOM helpers -------------------------------------------------------------------

function button(label: string, onClick: () => void, cls = ""): HTMLButtonElement {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, cls = "", text = ""): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text) e.textContent = text;
  return e;
}

// navigator.clipboard needs a secure context; plain http on a cluster is not one.
async function copyText(text: string, b: HTMLButtonElement): Promise<void> {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = el("textarea");
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = b.textContent;
  b.textContent = t.copied;
  setTimeout(() => (b.textContent = label), 1200);
}

function download(name: string, type: string, text: string): void {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** The first `n` characters as a reader counts them: a flag or a family emoji is one, never
 * cut in half (nor a UTF-16 surrogate pair). */
function firstChars(text: string, n: number): string {
  if (typeof Intl.Segmenter !== "function") return Array.from(text).slice(0, n).join(""); // Firefox < 125
  const graphemes = new Intl.Segmenter(undefined, { granularity: "grapheme" }).segment(text);
  return Array.from(graphemes, (g) => g.segment).slice(0, n).join("");
}

function fileName(c: Conversation, ext: string): string {
  const base = firstChars(c.title.replace(/[\\/:*?"<>|\s]+/g, "_"), 60) || "conversation";
  return `${base}.${ext}`;
}

function showNotice(text: string): void {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

// ---- sidebar ------------------------------------------------------------------------------

function renderSidebar(): void {
  ui.convList.replaceChildren();
  for (const c of conversations) {
    const li = el("li", c.id === current.id ? "current" : "");
    const open = button(c.title || t.untitled, () => switchTo(c), "open");
    if (c.id === current.id) open.setAttribute("aria-current", "true");
    li.append(open);
    if (c.id === current.id) {
      const actions = el("div", "conv-actions");
      actions.append(
        button(t.rename, () => rename(c)),
        button(t.delete, () => remove(c)),
        button(t.exportJson, () =>
          download(fileName(c, "json"), "application/json", JSON.stringify(c, null, 2)),
        ),
        button(t.exportMarkdown, () =>
          download(
            fileName(c, "md"),
            "text/markdown",
            toMarkdown(c, { you: t.you, assistant: t.assistant, system: t.system }),
          ),
        ),
      );
      li.append(actions);
    }
    ui.convList.append(li);
  }
}

function switchTo(c: Conversation): void {
  if (controller) return;
  current = c;
  persist();
  closeSidebar();
  renderAll();
  ui.input.focus();
}

function rename(c: Conversation): void {
  const name = prompt(t.renamePrompt, c.title);
  if (name === null || !name.trim()) return;
  c.title = name.trim();
  persist(c);
  renderAll(c === current);
}

function remove(c: Conversation): void {
  if (controller) {
    showNotice(t.waitForReply);
    return;
  }
  if (!confirm(t.deleteConfirm)) return;
  markDeleted(c.id);
  conversations = conversations.filter((x) => x !== c);
  current = conversations[0] ?? newConversation(t.untitled);
  if (!conversations.includes(current)) conversations.unshift(current);
  persist();
  renderAll();
}

function startNew(): void {
  if (controller) return;
  // An empty conversation is reused rather than piling up.
  const empty = conversations.find((c) => c.messages.length === 0);
  current = empty ?? newConversation(t.untitled);
  if (!empty) conversations.unshift(current);
  persist();
  closeSidebar();
  renderAll();
  ui.input.focus();
}

// The width below which the sidebar slides over the page (style.css's media query).
const phoneWidth = window.matchMedia("(max-width: 720px)");

function openSidebar(): void {
  ui.sidebar.classList.add("open");
  ui.backdrop.hidden = false;
  ui.main.inert = true; // Tab stays in the sidebar while it covers the page
  ui.menuToggle.setAttribute("aria-expanded", "true");
  ui.newChat.focus();
}

function closeSidebar(): void {
  if (!ui.sidebar.classList.contains("open")) return;
  const hadFocus = ui.sidebar.contains(document.activeElement);
  ui.sidebar.classList.remove("open");
  ui.backdrop.hidden = true;
  ui.main.inert = false;
  ui.menuToggle.setAttribute("aria-expanded", "false");
  if (hadFocus) ui.menuToggle.focus(); // keyboard users land where they opened it
}

// ---- messages -----------------------------------------------------------------------------

/** Redraws the page. `keepScroll`: the same conversation redrawn (a reply ended, a rename,
 * another tab's save), so a reader scrolled up stays where they are; else it shows the end. */
function renderAll(keepScroll = false): void {
  renderSidebar();
  ui.title.textContent = current.title || t.untitled;
  ui.system.value = current.system;
  renderMessages(keepScroll);
}

function renderMessages(keepScroll = false): void {
  const stick = !keepScroll || nearBottom();
  const top = ui.messages.scrollTop;
  ui.messages.replaceChildren();
  streamingEl = null;
  if (current.messages.length === 0) {
    ui.messages.append(el("p", "empty", t.empty));
    return;
  }
  current.messages.forEach((m, i) => ui.messages.append(messageView(m, i)));
  if (streaming?.conv === current) {
    // Redrawn mid-reply (a rename, another tab's save): the reply streams on into the new view.
    streamingEl = ui.messages.lastElementChild?.querySelector(".content") ?? null;
    streamingEl?.classList.add("streaming");
  }
  if (stick) scrollToEnd(true);
  else ui.messages.scrollTop = top;
}

function fillContent(box: HTMLElement, m: Message): void {
  if (m.role === "user") {
    box.textContent = m.content;
    return;
  }
  box.innerHTML = renderMarkdown(m.content);
  for (const pre of box.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (!code) continue;
    const copy = button(t.copyCode, () => copyText(code.textContent ?? "", copy), "copy-code");
    pre.prepend(copy);
  }
}

function statsText(m: Message): string {
  const parts: string[] = [];
  const s = m.stats;
  if (s) {
    // Typed checks: stats may come from an imported file or an older page.
    if (typeof s.ttftMs === "number") parts.push(`${t.ttft} ${Math.round(s.ttftMs)} ms`);
    if (typeof s.tokensPerSecond === "number") parts.push(`${s.tokensPerSecond.toFixed(1)} ${t.tokensPerSecond}`);
    if (typeof s.completionTokens === "number") parts.push(`${s.completionTokens} ${t.tokens}`);
    if (m.truncated) parts.push(t.truncated);
    if (typeof s.model === "string" && s.model) parts.push(s.model);
  } else if (m.truncated) {
    parts.push(t.truncated); // an imported reply may come without its stats
  }
  if (m.stopped) parts.push(t.stopped);
  return parts.join(" · ");
}

function messageView(m: Message, index: number): HTMLElement {
  const art = el("article", `msg ${m.role}`);
  art.dataset.index = String(index);
  art.append(el("div", "role", m.role === "user" ? t.you : t.assistant));
  const box = el("div", "content");
  fillContent(box, m);
  art.append(box);
  const last = index === current.messages.length - 1;
  if (m.role === "assistant") {
    const stats = el("div", "stats", statsText(m));
    art.append(stats);
  }
  if (m.error) {
    const err = el("div", "error");
    err.setAttribute("role", "alert");
    err.append(el("span", "", m.error));
    if (last) err.append(button(t.retry, () => regenerate(), "retry"));
    art.append(err);
  }
  const actions = el("div", "actions");
  const copy = button(t.copy, () => copyText(m.content, copy), "copy");
  actions.append(copy);
  if (m.role === "user") actions.append(button(t.edit, () => startEdit(art, box, index), "edit"));
  if (m.role === "assistant" && last) actions.append(button(t.regenerate, () => regenerate(), "regenerate"));
  art.append(actions);
  return art;
}

function startEdit(art: HTMLElement, box: HTMLElement, index: number): void {
  if (controller) return;
  const m = current.messages[index];
  const area = el("textarea", "edit-area");
  area.value = m.content;
  area.rows = Math.min(12, m.content.split("\n").length + 1);
  const row = el("div", "row");
  const submit = () => {
    const text = area.value.trim();
    if (!text || busyElsewhere()) return;
    current.messages = current.messages.slice(0, index);
    current.messages.push({ role: "user", content: text });
    persist();
    renderMessages();
    void generate();
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !composing(e)) {
      e.preventDefault();
      submit();
    } else if (e.key === "Escape") {
      e.stopPropagation();
      renderMessages();
    }
  });
  row.append(button(t.cancel, () => renderMessages()), button(t.save, submit, "primary"));
  box.replaceChildren(area, row);
  art.querySelector(".actions")?.remove();
  area.focus();
}

function nearBottom(): boolean {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToEnd(force = false): void {
  if (force || nearBottom()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

/** Re-renders the streaming reply at most once per frame, and for a long reply (whose every
 * render parses all of it again) only after four times its last render's cost, so that the
 * page keeps most of its time for scrolling and typing. */
function queueRender(m: Message): void {
  if (renderQueued) return;
  renderQueued = true;
  const wait = Math.max(0, lastRenderEnd + 4 * lastRenderCost - performance.now());
  setTimeout(
    () =>
      requestAnimationFrame(() => {
        renderQueued = false;
        if (!streamingEl) return;
        const stick = nearBottom();
        const start = performance.now();
        fillContent(streamingEl, m);
        lastRenderEnd = performance.now();
        lastRenderCost = lastRenderEnd - start;
        if (stick) scrollToEnd(true);
      }),
    wait,
  );
}

// ---- generation ---------------------------------------------------------------------------

function setBusy(busy: boolean): void {
  ui.send.textContent = busy ? t.stop : t.send;
  ui.send.classList.toggle("stop", busy);
  ui.newChat.disabled = busy;
  document.body.classList.toggle("busy", busy);
}

function requestMessages(): ChatMessage[] {
  const msgs: ChatMessage[] = [];
  if (current.system.trim()) msgs.push({ role: "system", content: current.system });
  for (const m of current.messages) {
    // A reply that failed before any text (a refusal, a lost connection) is not history.
    if (m.role === "assistant" && !m.content) continue;
    msgs.push({ role: m.role, content: m.content });
  }
  return msgs;
}

async function generate(): Promise<void> {
  const conv = current;
  // Whatever the notice said (a key, another tab, full storage) is asked again by this send:
  // a refusal or a failed save shows it anew.
  showNotice("");
  sentAt = performance.now();
  markStreaming(conv.id, true);
  const heartbeat = setInterval(() => markStreaming(conv.id, true), HEARTBEAT_MS);
  const messages = requestMessages();
  const reply: Message = { role: "assistant", content: "" };
  conv.messages.push(reply);
  streaming = { conv, reply };
  persist();
  renderAll();
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first: number | null = null;
  let last = started;
  const model = settings.model || ui.model.value;
  try {
    const result = await streamChat(
      {
        model,
        messages,
        temperature: settings.temperature,
        top_p: settings.topP,
        ...(settings.maxTokens ? { max_tokens: settings.maxTokens } : {}),
      },
      apiKey,
      controller.signal,
      (text) => {
        last = performance.now();
        first ??= last;
        reply.content += text;
        queueRender(reply);
      },
    );
    const n = result.completionTokens;
    // Decode speed: the tokens after the first, over the time from first to last.
    const rate = n !== null && n > 1 && first !== null && last > first ? ((n - 1) * 1000) / (last - first) : null;
    reply.stats = {
      model: result.model,
      ttftMs: first === null ? null : first - started,
      tokensPerSecond: rate,
      completionTokens: n,
    };
    if (result.finishReason === "length") reply.truncated = true; // cut by max tokens
  } catch (e) {
    if (controller.signal.aborted) {
      reply.stopped = true;
      reply.stats = { model, ttftMs: first === null ? null : first - started, tokensPerSecond: null, completionTokens: null };
    } else if (e instanceof AuthError) {
      // Kept with a Retry, so a dismissed dialog never strands the message without an answer.
      reply.error = t.keyTitle;
      resendAfterKey = conv;
      askForKey(Boolean(apiKey));
    } else if (leaving) {
      reply.stopped = true; // the page is going away: its fetch was cut, not the server's reply
    } else if (e instanceof ConnectionError) {
      reply.error = t.connectionLost;
    } else {
      reply.error = `${t.serverError} ${(e as Error).message}`;
    }
  } finally {
    clearInterval(heartbeat);
    markStreaming(conv.id, false);
    controller = null;
    streaming = null;
    setBusy(false);
    persist(conv);
    renderAll(conv === current);
  }
}

/** True (with a notice) when another tab is streaming a reply into this conversation. */
function busyElsewhere(): boolean {
  if (!streamingElsewhere(current.id)) return false;
  showNotice(t.busyElsewhere);
  return true;
}

/** Asks again for the reply a missing key refused (its failed reply is replaced). */
function generateAgain(conv: Conversation): void {
  if (conv === current) regenerate();
}

function regenerate(): void {
  if (controller || busyElsewhere()) return;
  const msgs = current.messages;
  if (msgs.length && msgs[msgs.length - 1].role === "assistant") msgs.pop();
  if (!msgs.length) return;
  persist();
  void generate();
}

function send(): void {
  if (controller) {
    // The second click of a double click on Send lands on Stop: not a request to stop.
    if (performance.now() - sentAt > 400) controller.abort();
    return;
  }
  const text = ui.input.value.trim();
  if (!text || busyElsewhere()) return; // the draft stays
  ui.input.value = "";
  fitInput();
  current.messages.push({ role: "user", content: text });
  // By code points, not UTF-16 units: an emoji at the cut stays whole.
  if (current.title === t.untitled) current.title = firstChars(text.split("\n")[0], 40);
  persist();
  void generate();
}

// ---- models and the API key --------------------------------------------------------------

/** Fills the model picker; false when the server wants a key first. */
async function loadModels(): Promise<boolean> {
  try {
    const ids = await listModels(apiKey);
    ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (!ids.length) ui.model.append(new Option(t.noModels, ""));
    if (!ids.includes(settings.model)) settings.model = ids[0] ?? "";
    ui.model.value = settings.model;
    saveSettings(settings);
    showNotice("");
    return true;
  } catch (e) {
    if (e instanceof AuthError) {
      askForKey(Boolean(apiKey));
      return false;
    }
    showNotice(`${t.modelsFailed} ${(e as Error).message}`);
    return true;
  }
}

function askForKey(wrong: boolean): void {
  ui.keyWrong.hidden = !wrong;
  ui.keyInput.value = apiKey;
  ui.keyInput.setCustomValidity(""); // the saved key is a valid one, whatever was typed before
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
  ui.keyInput.select();
}

// A key goes into an HTTP header, which takes no character past Latin-1 (fetch throws): a
// key pasted with a typographic quote or a zero-width space is refused here, saying why.
ui.keyInput.addEventListener("input", () => {
  ui.keyInput.setCustomValidity(validApiKey(ui.keyInput.value.trim()) ? "" : t.keyChars);
});

// The dialog's form closes it on submit; a refused key opens it again.
ui.keyForm.addEventListener("submit", async () => {
  apiKey = ui.keyInput.value.trim();
  const kept = saveApiKey(apiKey); // storage full: the key still serves this visit
  if (!(await loadModels())) return;
  const conv = resendAfterKey;
  resendAfterKey = null;
  if (conv) generateAgain(conv);
  if (!kept) showNotice(t.keyNotSaved); // after the resend, which clears the notice
});

/** The key dialog dismissed, by its button or Esc: say that the page still needs a key. */
function keyDismissed(): void {
  resendAfterKey = null;
  showNotice(t.keyTitle);
}

ui.keyCancel.addEventListener("click", () => {
  ui.keyDialog.close();
  keyDismissed();
});
ui.keyDialog.addEventListener("cancel", keyDismissed);

// ---- wiring -------------------------------------------------------------------------------

function clamp(v: number, low: number, high: number): number {
  return Math.min(high, Math.max(low, v));
}

function numberOr(input: HTMLInputElement, fallback: number | null): number | null {
  const v = input.valueAsNumber;
  return Number.isFinite(v) ? v : fallback;
}

function initSettings(): void {
  ui.temperature.value = String(settings.temperature);
  ui.topP.value = String(settings.topP);
  ui.maxTokens.value = settings.maxTokens === null ? "" : String(settings.maxTokens);
  // Values the server would refuse are brought into its ranges, and the fields show what is
  // sent: temperature 0-2, top p above 0 and at most 1, max tokens a whole number from 1
  // (anything else: empty, the server decides).
  const update = () => {
    settings.temperature = clamp(numberOr(ui.temperature, 0.7) ?? 0.7, 0, 2);
    settings.topP = clamp(numberOr(ui.topP, 1) ?? 1, 0.01, 1);
    const max = numberOr(ui.maxTokens, null);
    settings.maxTokens = max !== null && max >= 1 ? Math.floor(max) : null;
    ui.temperature.value = String(settings.temperature);
    ui.topP.value = String(settings.topP);
    ui.maxTokens.value = settings.maxTokens === null ? "" : String(settings.maxTokens);
    saveSettings(settings);
  };
  for (const input of [ui.temperature, ui.topP, ui.maxTokens]) input.addEventListener("change", update);
  ui.system.addEventListener("input", () => {
    current.system = ui.system.value;
    persist();
  });
  ui.model.addEventListener("change", () => {
    settings.model = ui.model.value;
    saveSettings(settings);
  });
  ui.settingsToggle.addEventListener("click", () => {
    const open = ui.settings.hidden;
    ui.settings.hidden = !open;
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
  });
  ui.setKey.addEventListener("click", () => askForKey(false));
}

/** Whether a key press belongs to an IME composition. Safari ends the composition before the
 * keydown of the Enter that confirms it, which then says isComposing false but keyCode 229. */
function composing(e: KeyboardEvent): boolean {
  return e.isComposing || e.keyCode === 229;
}

/** The message box grows with its text, up to its CSS max-height (then it scrolls). */
function fitInput(): void {
  ui.input.style.height = "auto";
  ui.input.style.height = `${ui.input.scrollHeight + ui.input.offsetHeight - ui.input.clientHeight}px`;
}

function initComposer(): void {
  ui.input.addEventListener("input", fitInput);
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (e) => {
    // Enter that confirms a Chinese/Japanese IME candidate must not send.
    if (e.key === "Enter" && !e.shiftKey && !composing(e)) {
      e.preventDefault();
      // While a reply streams, Enter keeps the draft; Esc or the Stop button stop the reply.
      if (!controller) send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || ui.keyDialog.open) return;
    if (ui.sidebar.classList.contains("open")) {
      closeSidebar(); // the first Esc closes what covers the page; a reply streams on
    } else if (controller) {
      e.preventDefault();
      controller.abort();
    }
  });
  ui.newChat.addEventListener("click", startNew);
  ui.menuToggle.addEventListener("click", () =>
    ui.sidebar.classList.contains("open") ? closeSidebar() : openSidebar(),
  );
  ui.backdrop.addEventListener("click", closeSidebar);
  phoneWidth.addEventListener("change", closeSidebar); // widened: the sidebar is simply there
  ui.importFile.addEventListener("change", async () => {
    const file = ui.importFile.files?.[0];
    ui.importFile.value = "";
    if (!file) return;
    if (controller) {
      showNotice(t.waitForReply);
      return;
    }
    const c = importConversation(await file.text());
    if (!c) {
      showNotice(t.importFailed);
      return;
    }
    showNotice("");
    if (!c.title.trim()) c.title = firstChars(c.messages[0]?.content.split("\n")[0] ?? "", 40) || t.untitled;
    // An empty conversation (a fresh page, no system prompt of its own) gives way to the imported one.
    if (current.messages.length === 0 && !current.system.trim()) {
      markDeleted(current.id);
      conversations = conversations.filter((x) => x !== current);
    }
    conversations.unshift(c);
    current = c;
    persist();
    closeSidebar();
    renderAll();
  });
}

/** Another tab saved its conversations: show them here too. */
function adoptOtherTabs(e: StorageEvent): void {
  if (e.key !== CONVERSATIONS && e.key !== null) return;
  conversations = mergeConversations(conversations, loadConversations(), streaming?.conv ?? null);
  const same = conversations.find((c) => c.id === current.id);
  if (same && same !== current) {
    current = same; // the other tab added to the conversation shown here
    renderAll(true);
    return;
  }
  if (!same) conversations.unshift(current); // deleted there: it stays here until left
  renderSidebar();
}

// Leaving or reloading mid-reply keeps the text so far, as a stopped reply.
window.addEventListener("pagehide", () => {
  leaving = true;
  if (!streaming) return;
  streaming.reply.stopped = true;
  markStreaming(streaming.conv.id, false);
  persist(streaming.conv);
});
window.addEventListener("pageshow", () => (leaving = false)); // back from the bfcache
window.addEventListener("storage", adoptOtherTabs);

applyStrings();
initSettings();
initComposer();
renderAll();
ui.input.focus();
void loadModels();
