// Conversations and settings, kept in the browser's localStorage.

export interface ReplyStats {
  model: string;
  ttftMs: number | null;
  tokensPerSecond: number | null;
  completionTokens: number | null;
}

export interface Message {
  role: "user" | "assistant";
  content: string;
  stats?: ReplyStats;
  /** Set when the reply ended early: "stopped", "connection" or a server message. */
  error?: string;
  stopped?: boolean;
  /** Set when the reply ran into its max tokens. */
  truncated?: boolean;
}

export interface Conversation {
  id: string;
  title: string;
  created: number;
  updated: number;
  system: string;
  messages: Message[];
}

export interface Settings {
  model: string;
  temperature: number;
  topP: number;
  maxTokens: number | null;
}

export const CONVERSATIONS = "ember.conversations";
// Conversations getting a reply now, and in which tab: conversation id -> {tab, at}.
const STREAMING = "ember.streaming";
const CURRENT = "ember.current";
const SETTINGS = "ember.settings";
const API_KEY = "ember.apiKey";

const DEFAULT_SETTINGS: Settings = { model: "", temperature: 0.7, topP: 1, maxTokens: 512 };

function read<T>(key: string, fallback: T): T {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : (JSON.parse(raw) as T);
  } catch {
    return fallback;
  }
}

export function loadConversations(): Conversation[] {
  const list = read<unknown>(CONVERSATIONS, []);
  if (!Array.isArray(list)) return [];
  // Saved by an older page, or by hand: a missing system prompt is an empty one.
  return list
    .filter(isConversation)
    .map((c) => (typeof c.system === "string" ? c : { ...c, system: "" }));
}

// What this page last saved: when the stored list is still that, no other tab has saved since.
let lastSaved: string | null = null;

export function saveConversations(list: Conversation[]): void {
  const text = JSON.stringify(list);
  localStorage.setItem(CONVERSATIONS, text);
  lastSaved = text;
}

/** Whether another tab of the page has saved its conversations since this page did. */
export function othersSaved(): boolean {
  return localStorage.getItem(CONVERSATIONS) !== lastSaved;
}

// Ids of deleted conversations, so that a page open in another tab does not bring them back.
const DELETED = "ember.deleted";
const MAX_DELETED = 500;

export function loadDeleted(): Set<string> {
  const ids = read<unknown>(DELETED, []);
  return new Set(Array.isArray(ids) ? ids.filter((x): x is string => typeof x === "string") : []);
}

export function markDeleted(id: string): void {
  const ids = [...loadDeleted(), id].slice(-MAX_DELETED);
  try {
    localStorage.setItem(DELETED, JSON.stringify(ids));
  } catch {
    // Storage full: the conversation is still deleted here, if not for other open tabs.
  }
}

/**
 * This page's conversations and those stored by other tabs of the same site: of two copies of
 * one conversation the later updated wins, deleted ones stay deleted, newest created first.
 * `keep`: a conversation whose copy here wins whatever the dates (the one streaming a reply).
 */
export function mergeConversations(
  mine: Conversation[],
  stored: Conversation[],
  keep: Conversation | null = null,
): Conversation[] {
  const deleted = loadDeleted();
  const byId = new Map<string, Conversation>();
  for (const c of stored) if (!deleted.has(c.id)) byId.set(c.id, c);
  for (const c of mine) {
    const other = byId.get(c.id);
    if (c === keep || (!deleted.has(c.id) && (!other || (c.updated ?? 0) >= (other.updated ?? 0)))) {
      byId.set(c.id, c);
    }
  }
  return [...byId.values()].sort((a, b) => (b.created ?? 0) - (a.created ?? 0));
}

export function loadCurrentId(): string | null {
  return localStorage.getItem(CURRENT);
}

export function saveCurrentId(id: string): void {
  localStorage.setItem(CURRENT, id);
}

export function loadSettings(): Settings {
  return { ...DEFAULT_SETTINGS, ...read<Partial<Settings>>(SETTINGS, {}) };
}

/** Stores a value; false when the browser's storage is full (the page goes on without it). */
function write(key: string, value: string): boolean {
  try {
    localStorage.setItem(key, value);
    return true;
  } catch {
    return false;
  }
}

export function saveSettings(s: Settings): boolean {
  return write(SETTINGS, JSON.stringify(s));
}

/** A key an HTTP header can carry: visible ASCII (letters, digits, punctuation), no spaces. */
export function validApiKey(key: string): boolean {
  return /^[!-~]*$/.test(key);
}

export function loadApiKey(): string {
  const key = localStorage.getItem(API_KEY) ?? "";
  return validApiKey(key) ? key : ""; // one saved before keys were checked: asked for again
}

export function saveApiKey(key: string): boolean {
  return write(API_KEY, key);
}

// A tab streaming a reply marks its conversation, and renews the mark every HEARTBEAT_MS; a
// mark older than STALE_MS is a tab that closed or crashed mid-reply.
export const HEARTBEAT_MS = 2_000;
const STALE_MS = 8_000;

interface StreamingMark {
  tab: string;
  at: number;
}

function liveMarks(): Record<string, StreamingMark> {
  const marks = read<Record<string, StreamingMark>>(STREAMING, {});
  const live: Record<string, StreamingMark> = {};
  if (typeof marks !== "object" || marks === null) return live;
  for (const [id, m] of Object.entries(marks)) {
    if (typeof m?.tab === "string" && typeof m.at === "number" && Date.now() - m.at < STALE_MS) {
      live[id] = m;
    }
  }
  return live;
}

/** Marks (or unmarks) a conversation as getting a reply in this tab. */
export function markStreaming(conversationId: string, on: boolean): void {
  const marks = liveMarks();
  if (on) marks[conversationId] = { tab: TAB_ID, at: Date.now() };
  else if (marks[conversationId]?.tab === TAB_ID) delete marks[conversationId];
  write(STREAMING, JSON.stringify(marks));
}

/** Whether another tab is streaming a reply into this conversation now: its save at the end
 * would overwrite whatever this tab added meanwhile. */
export function streamingElsewhere(conversationId: string): boolean {
  const mark = liveMarks()[conversationId];
  return mark !== undefined && mark.tab !== TAB_ID;
}

// crypto.randomUUID() exists only in secure contexts; the page is often served over plain http.
function newId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export const TAB_ID = newId();

export function newConversation(title: string): Conversation {
  const now = Date.now();
  return { id: newId(), title, created: now, updated: now, system: "", messages: [] };
}

export function isConversation(x: unknown): x is Conversation {
  if (typeof x !== "object" || x === null) return false;
  const c = x as Record<string, unknown>;
  return (
    typeof c.id === "string" &&
    typeof c.title === "string" &&
    Array.isArray(c.messages) &&
    c.messages.every(
      (m) =>
        typeof m === "object" &&
        m !== null &&
        (m.role === "user" || m.role === "assistant") &&
        typeof m.content === "string",
    )
  );
}

/** Stats from a file: only well-typed fields survive, so a bad file cannot break the page. */
function cleanStats(s: unknown): ReplyStats | undefined {
  if (typeof s !== "object" || s === null) return undefined;
  const r = s as Record<string, unknown>;
  const num = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);
  return {
    model: typeof r.model === "string" ? r.model : "",
    ttftMs: num(r.ttftMs),
    tokensPerSecond: num(r.tokensPerSecond),
    completionTokens: num(r.completionTokens),
  };
}

/** A conversation read from an exported JSON file, with fresh id and times. */
export function importConversation(text: string): Conversation | null {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    return null;
  }
  // A hand-written file may leave out the id (a new one is made anyway) and the title.
  if (typeof data === "object" && data !== null && !Array.isArray(data)) data = { id: "", title: "", ...data };
  // `ember chat`'s /save (an OpenAI request's messages) gives the system prompt as messages.
  let system = "";
  if (typeof data === "object" && data !== null && Array.isArray((data as { messages?: unknown }).messages)) {
    const d = data as { messages: unknown[]; system?: unknown };
    const isSystem = (m: unknown) =>
      typeof m === "object" && m !== null && (m as Message).role === ("system" as string) && typeof (m as Message).content === "string";
    system = d.messages.filter(isSystem).map((m) => (m as Message).content).join("\n\n");
    data = { ...d, messages: d.messages.filter((m) => !isSystem(m)) };
  }
  if (!isConversation(data)) return null;
  const now = Date.now();
  return {
    id: newId(),
    title: data.title,
    created: now,
    updated: now,
    system: (typeof data.system === "string" && data.system) || system,
    // As exported: the reply's stats and how it ended (stopped, cut at max tokens, an error).
    messages: data.messages.map((m) => ({
      role: m.role,
      content: m.content,
      stats: cleanStats(m.stats),
      ...(m.stopped === true ? { stopped: true } : {}),
      ...(m.truncated === true ? { truncated: true } : {}),
      ...(typeof m.error === "string" && m.error ? { error: m.error } : {}),
    })),
  };
}

export function toMarkdown(c: Conversation, names: { you: string; assistant: string; system: string }): string {
  const parts = [`# ${c.title}`];
  if (c.system) parts.push(`## ${names.system}\n\n${c.system}`);
  for (const m of c.messages) {
    parts.push(`## ${m.role === "user" ? names.you : names.assistant}\n\n${m.content}`);
  }
  return parts.join("\n\n") + "\n";
}
