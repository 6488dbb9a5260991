// The OpenAI-compatible API of the server that served this page: the model list and streamed
// chat completions. Paths are relative, so the page also works behind a prefix.

import { EventSourceParserStream } from "eventsource-parser/stream";

/** The server wants a (different) API key: 401. */
export class AuthError extends Error {}

/** The server refused the request (4xx/5xx, or an error event in the stream): its message. */
export class ServerError extends Error {
  constructor(message: string, readonly status: number) {
    super(message);
  }
}

/** The connection dropped (or never opened) before the reply was complete. */
export class ConnectionError extends Error {}

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

export interface ChatRequest {
  model: string;
  messages: ChatMessage[];
  temperature: number;
  top_p: number;
  max_tokens?: number;
}

export interface StreamResult {
  model: string;
  finishReason: string | null;
  completionTokens: number | null;
}

function headers(apiKey: string, json = false): HeadersInit {
  const h: Record<string, string> = {};
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(res: Response): Promise<Error> {
  if (res.status === 401) return new AuthError(await errorMessage(res));
  return new ServerError(await errorMessage(res), res.status);
}

async function errorMessage(res: Response): Promise<string> {
  const text = await res.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (typeof body?.error?.message === "string") return body.error.message;
    if (typeof body?.detail === "string") return body.detail;
  } catch {
    // not JSON: fall through to the raw text
  }
  const status = `HTTP ${res.status} ${res.statusText}`.trim();
  // A proxy's HTML error page says nothing its status line does not; long text is cut.
  const raw = text.trim();
  if (!raw || raw.startsWith("<")) return status;
  return raw.length > 300 ? `${raw.slice(0, 300)}…` : raw;
}

/** fetch() that turns network failures into ConnectionError and keeps aborts as they are. */
async function request(url: string, init: RequestInit): Promise<Response> {
  try {
    return await fetch(url, init);
  } catch (e) {
    if (init.signal?.aborted) throw e;
    throw new ConnectionError(String(e));
  }
}

export async function listModels(apiKey: string): Promise<string[]> {
  const res = await request("v1/models", { headers: headers(apiKey) });
  if (!res.ok) throw await failure(res);
  const body = await res.json();
  const cards: { id: string; root?: string | null }[] = body.data ?? [];
  // Ember names the chat model's root on its cards; the embedding encoder's card has none.
  const chat = cards.filter((m) => m.root);
  return (chat.length ? chat : cards).map((m) => m.id);
}

/** One event's data as a chunk: an object, or the server's reply is not one the page reads. */
function readChunk(data: string): any {
  let chunk: unknown;
  try {
    chunk = JSON.parse(data);
  } catch {
    chunk = null;
  }
  if (typeof chunk !== "object" || chunk === null) {
    throw new ServerError(`The server sent an event that is not a chat chunk: ${data.slice(0, 100)}`, 502);
  }
  return chunk;
}

/** Streams one chat completion; onDelta gets each piece of reply text as it arrives. */
export async function streamChat(
  body: ChatRequest,
  apiKey: string,
  signal: AbortSignal,
  onDelta: (text: string) => void,
): Promise<StreamResult> {
  const res = await request("v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey, true),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!res.ok || !res.body) throw await failure(res);
  const result: StreamResult = { model: body.model, finishReason: null, completionTokens: null };
  const events = res.body
    .pipeThrough(new TextDecoderStream())
    .pipeThrough(new EventSourceParserStream())
    .getReader();
  let done = false;
  try {
    while (!done) {
      const next = await events.read();
      if (next.done) break;
      if (next.value.data === "[DONE]") {
        done = true;
        break;
      }
      const chunk = readChunk(next.value.data);
      if (chunk.error) throw new ServerError(chunk.error.message ?? String(chunk.error), 500);
      if (chunk.model) result.model = chunk.model;
      if (chunk.usage) result.completionTokens = chunk.usage.completion_tokens ?? null;
      for (const choice of chunk.choices ?? []) {
        const text = choice.delta?.content;
        if (typeof text === "string" && text) onDelta(text);
        if (choice.finish_reason) result.finishReason = choice.finish_reason;
      }
    }
  } catch (e) {
    // Hang up, so that the server stops generating what nobody will read.
    if (!signal.aborted) void events.cancel().catch(() => undefined);
    if (signal.aborted || e instanceof ServerError) throw e;
    throw new ConnectionError(String(e));
  } finally {
    events.releaseLock();
  }
  // A stream that ends without [DONE] was cut off.
  if (!done) throw new ConnectionError("stream ended early");
  return result;
}
