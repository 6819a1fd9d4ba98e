// Server-sent events over fetch(): EventSource cannot send the X-API-Key header, so the page
// reads the stream itself. The parser follows the WHATWG event-stream format (docs/events.md).

const FINAL_EVENTS = new Set(["completed", "failed", "cancelled"]);
const DEFAULT_RETRY_MS = 2000;
const MAX_FAILED_CONNECTS = 3;   // then the caller falls back to long-polling

/** Incremental parser: push() text chunks as they arrive, onEvent gets {id, event, data}. */
export class SseParser {
  constructor(onEvent, onRetry = () => {}) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.buffer = "";
    this.lastEventId = "";
    this.skipNextLf = false;   // a chunk ended on "\r": a "\n" opening the next one ends the same line
    this.reset();
  }

  reset() {
    this.eventType = "";
    this.data = [];
  }

  push(text) {
    if (this.skipNextLf && text.startsWith("\n")) text = text.slice(1);
    this.skipNextLf = false;
    this.buffer += text;
    const lines = this.buffer.split(/\r\n|\r|\n/);
    this.buffer = lines.pop();   // the unfinished line waits for the next chunk
    if (this.buffer === "" && this.endsWithCr(text) && lines.length) this.skipNextLf = true;
    for (const line of lines) this.line(line);
  }

  endsWithCr(text) {
    return text.endsWith("\r");
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return;   // a comment: the keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.eventType = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.onRetry(Number(value));
  }

  dispatch() {
    const event = {id: this.lastEventId, event: this.eventType || "message", data: this.data.join("\n")};
    const hasData = this.data.length > 0;
    this.reset();
    if (hasData) this.onEvent(event);
  }
}

/** Raised when the stream cannot be had (no such route, too many streams, network): poll instead. */
export class StreamUnavailable extends Error {}

/** An answer the caller must show as it is (a wrong key, a task that is gone). */
export class StreamRefused extends Error {
  constructor(response, body) {
    super(`HTTP ${response.status}`);
    this.status = response.status;
    this.body = body;
  }
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); }, {once: true});
});

/**
 * Follows one task's events until its final one, reconnecting with Last-Event-ID when the stream
 * ends early (the server bounds each stream) or drops. onEvent(type, data) gets each event with its
 * JSON data parsed. Resolves with the final event's data; rejects with StreamUnavailable when the
 * stream cannot be had, StreamRefused on 401/403/404.
 */
export async function followEvents(url, headers, onEvent, signal) {
  let lastEventId = "";
  let retryMs = DEFAULT_RETRY_MS;
  let failedConnects = 0;
  for (;;) {
    let final = null;
    const parser = new SseParser((event) => {
      lastEventId = event.id || lastEventId;
      let data;
      try { data = JSON.parse(event.data); } catch { return; }   // not ours to show
      onEvent(event.event, data);
      if (FINAL_EVENTS.has(event.event)) final = {type: event.event, data};
    }, (ms) => { retryMs = ms; });
    try {
      const response = await connect(url, headers, lastEventId, signal);
      failedConnects = 0;
      await readInto(response, parser, signal, () => final !== null);
    } catch (error) {
      if (signal?.aborted || error instanceof StreamRefused || error instanceof StreamUnavailable) throw error;
      if (++failedConnects >= MAX_FAILED_CONNECTS) throw new StreamUnavailable(String(error));
    }
    if (final) return final;
    await sleep(retryMs, signal);
  }
}

async function connect(url, headers, lastEventId, signal) {
  const requestHeaders = {...headers, Accept: "text/event-stream"};
  if (lastEventId) requestHeaders["Last-Event-ID"] = lastEventId;
  const response = await fetch(url, {headers: requestHeaders, signal, cache: "no-store"});
  const type = response.headers.get("Content-Type") || "";
  if (response.ok && type.startsWith("text/event-stream")) return response;
  if ([401, 403].includes(response.status)) throw new StreamRefused(response, await response.json().catch(() => null));
  // 404 (also: a service without the events route), 405, 503 (too many streams), anything else: poll.
  throw new StreamUnavailable(`HTTP ${response.status}`);
}

async function readInto(response, parser, signal, done) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    while (!done()) {
      const {value, done: ended} = await reader.read();
      if (ended) break;
      parser.push(value);
    }
  } finally {
    reader.cancel().catch(() => {});   // after the final event the server closes; never hold it open
  }
  if (signal?.aborted) throw signal.reason;
}
